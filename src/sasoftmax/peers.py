"""Deprecated import path: the peer normalizers live in :mod:`sasoftmax.normalizers.peers`."""

from ._compat import moved

moved(__name__, "sasoftmax.normalizers.peers")
