"""Deprecated import path: this module is now :mod:`sasoftmax.lm.cli`."""

from ._compat import moved

moved(__name__, "sasoftmax.lm.cli")
