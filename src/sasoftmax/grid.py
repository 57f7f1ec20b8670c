"""Deprecated import path: this module is now :mod:`sasoftmax.lm.grid`."""

from ._compat import moved

moved(__name__, "sasoftmax.lm.grid")
