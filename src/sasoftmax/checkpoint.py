"""Deprecated import path: this module is now :mod:`sasoftmax.lm.checkpoint`."""

from ._compat import moved

moved(__name__, "sasoftmax.lm.checkpoint")
