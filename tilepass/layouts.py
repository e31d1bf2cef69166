"""The layouts :mod:`tilepass.token_layout` gives the values of an MoE region: which
rows belong to which token.

Layouts (``T`` = tokens of the tile, dim 0 is the row dim):

* ``Tok(m, perm)``: ``T*m`` rows, ``m`` consecutive rows per token; if ``perm`` is set,
  the rows are in the order of that permutation (a ``sort`` node) instead.
* ``Ext``: does not depend on tokens (weights, biases, constants).
* ``Perm(m, key)``: the indices of a sort of ``Tok(m)`` keys; ``RowIdx(target, key)``:
  row indices into ``Tok(target)`` rows, in the order of ``key`` (``perm // k``).
* ``InvPerm(key)``: the inverse of a permutation (``inv[perm] = arange``).
* ``Counts(key)`` / ``Offsets(key)``: per-expert group sizes of keys sorted by ``key``
  (``histc``) and their running sum (``cumsum``): what a grouped matmul takes as ``offs``.
* ``Arange(m)``: ``arange(T*m)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class Tok:
    m: int = 1
    perm: fx.Node | None = None
    row_dims: int = 1  # 2 for a [batch, seq, F] tensor (natural order, m=1 only)


@dataclasses.dataclass(frozen=True)
class Ext:
    pass


@dataclasses.dataclass(frozen=True)
class Perm:
    m: int
    key: fx.Node


@dataclasses.dataclass(frozen=True)
class RowIdx:
    target: int
    key: fx.Node
    m: int  # rows of the index tensor itself


@dataclasses.dataclass(frozen=True)
class InvPerm:
    key: fx.Node
    m: int


@dataclasses.dataclass(frozen=True)
class EmptyLike:  # uninitialised buffer shaped like a permutation (becomes InvPerm)
    key: fx.Node
    m: int


@dataclasses.dataclass(frozen=True)
class Counts:
    key: fx.Node
    bins: Any  # (bins, min, max) of the histc


@dataclasses.dataclass(frozen=True)
class Offsets:
    key: fx.Node
    bins: Any


@dataclasses.dataclass(frozen=True)
class Arange:
    m: int


@dataclasses.dataclass(frozen=True)
class Tuple:
    items: tuple


@dataclasses.dataclass(frozen=True)
class NoValue:  # setitem and other statements
    pass


EXT = Ext()


class NotTokenwise(Exception):
    """The op moves data between tokens (or cannot be shown not to)."""
