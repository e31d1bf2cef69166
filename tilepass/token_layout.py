"""The layout rules of the engine's judge: which rows of a tensor belong to which token,
through an MoE block's dispatch.

The plain case, an op on rows in one layout that acts on each row alone, is the dense
rule of :mod:`tilepass.rowwise`; :class:`tilepass.engine.Judge` asks it first. An MoE
block also repeats rows (one per selected expert), sorts them by expert, gathers
per-expert weights, runs grouped matmuls over contiguous expert groups, and un-sorts.
None of that mixes tokens, but it moves rows around. These rules follow the rows: every
tensor in a candidate region gets a :class:`Layout`, and an op is accepted only if a rule
says where each output row comes from. Tiling is exact when every region output is back
in natural token order (``Tok(m=1)``).

The layouts are in :mod:`tilepass.layouts`.

It knows nothing of tiling or FX rewriting; it only judges.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import rowwise
from .fx_utils import example_value, op_name
from .layouts import (EXT, Arange, Counts, EmptyLike, Ext, InvPerm, NoValue, NotTokenwise, Offsets, Perm,
                      RowIdx, Tok, Tuple)


def _grouped_mm_targets() -> set:
    targets = set()
    for mod, name in ((getattr(torch.ops, "transformers", None), "grouped_mm_fallback"),):
        packet = getattr(mod, name, None) if mod is not None else None
        if packet is not None:
            targets.add(packet)
            targets.add(getattr(packet, "default", packet))
    for fn in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
        if fn is not None:
            targets.add(fn)
    return targets


_CREATION = {torch.arange}
_SORT = {torch.sort, torch.argsort}
_HISTC = {torch.histc}
_CUMSUM = {torch.cumsum}
_BMM = {torch.bmm, torch.matmul, operator.matmul}
_EMPTY_LIKE = {torch.empty_like}
_VIEW_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous"}
_CASTS = {"int", "long", "float", "to", "type"}
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze}


def _is(node: fx.Node, functions: set, methods: set | frozenset = frozenset()) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def is_view(node: fx.Node) -> bool:
    """A reshape-like op (view, reshape, flatten, (un)squeeze, contiguous)."""
    return _is(node, _VIEW_FUNCTIONS, _VIEW_METHODS)


class LayoutAnalysis:
    """Assign layouts to the nodes of a candidate region, in graph order."""

    def __init__(self, num_tokens: int):
        self.T = num_tokens
        self.layouts: dict[fx.Node, Any] = {}
        self.grouped_mm = _grouped_mm_targets()
        self.experts: set[fx.Node] = set()  # the expert computations (grouped matmuls, gathered-weight bmm)

    # -- helpers -------------------------------------------------------------------------
    def of(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.layouts.get(a, EXT)
        if isinstance(a, (list, tuple)):
            inner = [self.of(x) for x in a]
            toks = [l for l in inner if not isinstance(l, Ext)]
            if toks:
                raise NotTokenwise("a list of token tensors")
            return EXT
        return EXT

    def rows_m(self, n: Any) -> int | None:
        """m such that ``n == T*m``."""
        if isinstance(n, int) and n > 0 and n % self.T == 0:
            return n // self.T
        return None

    def is_row_count_creation(self, node: fx.Node) -> bool:
        return _is(node, _CREATION) and len(node.args) == 1 and self.rows_m(node.args[0]) is not None

    # -- the rules -----------------------------------------------------------------------
    def infer(self, node: fx.Node) -> Any:
        name = op_name(node)
        val = example_value(node)
        args = node.args
        arg_layouts = [self.of(a) for a in args] + [self.of(v) for v in node.kwargs.values()]
        if all(isinstance(l, Ext) for l in arg_layouts) and not _is(node, _CREATION):
            return EXT

        if node.target is operator.getitem:
            return self._getitem(node)
        if node.target is operator.setitem:
            return self._setitem(node)
        if _is(node, _SORT, {"sort", "argsort"}):
            return self._sort(node)
        if _is(node, _HISTC, {"histc"}):
            return self._histc(node)
        if _is(node, _CUMSUM, {"cumsum"}):
            src = self.of(args[0])
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(src, Counts) and dim in (0, -1):
                return Offsets(src.key, src.bins)
            if isinstance(src, Tok):
                return self._along_features(node, src, dim, "cumsum")
            raise NotTokenwise(f"op `cumsum` over {self._describe(src)}")
        if _is(node, self.grouped_mm):
            return self._grouped(node)
        if _is(node, _EMPTY_LIKE, {"new_empty"}) and isinstance(self.of(args[0]), Perm):
            p = self.of(args[0])
            return EmptyLike(p.key, p.m)
        if node.op == "call_function" and node.target is operator.floordiv:
            src, d = self.of(args[0]), args[1]
            if isinstance(src, Perm) and isinstance(d, int) and d > 0 and src.m % d == 0:
                return RowIdx(src.m // d, src.key, src.m)
            raise NotTokenwise("op `floordiv` on token data")
        if _is(node, {torch.repeat_interleave}, {"repeat_interleave"}):
            src = self.of(args[0])
            reps = node.kwargs.get("repeats", args[1] if len(args) > 1 else None)
            dim = node.kwargs.get("dim", args[2] if len(args) > 2 else None)
            if isinstance(src, Tok) and src.perm is None and src.row_dims == 1 and isinstance(reps, int) and dim == 0:
                return Tok(src.m * reps)
            raise NotTokenwise("op `repeat_interleave` other than over the token rows")
        if _is(node, _CREATION):
            n = args[0] if len(args) == 1 else None
            m = self.rows_m(n)
            if m is not None and len(args) == 1:
                return Arange(m)
            raise NotTokenwise(f"op `{name}` with a size that is not a row count")
        if _is(node, set(), _CASTS) and len(node.args) <= 2 and not node.kwargs.get("device"):
            src = self.of(args[0])
            if not isinstance(src, (Tok, Ext, Tuple, NoValue)):
                return src  # e.g. sorted expert ids or offsets cast to int32
        if _is(node, _VIEW_FUNCTIONS, _VIEW_METHODS):
            return self._view(node)
        if _is(node, set(), {"type_as"}) and isinstance(self.of(args[0]), (Tok, Ext)):
            return self.of(args[0])  # the other tensor gives only its dtype
        if _is(node, set(), {"expand"}):
            return self._expand(node)
        if _is(node, _BMM, {"bmm", "matmul"}) and not rowwise.matmul_operands(node) or _is(node, {torch.bmm}, {"bmm"}):
            return self._bmm(node)
        if rowwise.is_matmul(node):
            x = rowwise.matmul_operands(node)
            if x is not None and isinstance(self.of(x[0]), Tok) and isinstance(self.of(x[1]), Ext):
                w = example_value(x[1])
                if isinstance(w, torch.Tensor) and w.dim() == 2:
                    return self.of(x[0])
            raise NotTokenwise(f"op `{name}` between token tensors")
        return self._generic(node)

    def _describe(self, layout: Any) -> str:
        if isinstance(layout, Tok):
            return "the token rows"
        return type(layout).__name__

    def _along_features(self, node: fx.Node, src: Tok, dim: Any, name: str) -> Tok:
        val = example_value(node.args[0])
        nd = val.dim() if isinstance(val, torch.Tensor) else 0
        if not isinstance(dim, int):
            raise NotTokenwise(f"op `{name}` with dim {dim!r}")
        d = dim % nd if nd else dim
        if d < src.row_dims:
            raise NotTokenwise(f"op `{name}` over dim {dim} mixes tokens")
        if src.row_dims != 1:
            raise NotTokenwise(f"op `{name}` on a [batch, seq, ...] tensor")
        return src

    def _getitem(self, node: fx.Node) -> Any:
        src, idx = node.args
        ls = self.of(src)
        if isinstance(ls, Tuple):
            return ls.items[idx] if isinstance(idx, int) else _raise("getitem on a tuple with a non-int index")
        if isinstance(idx, fx.Node):
            li = self.of(idx)
            if isinstance(ls, Ext) and isinstance(li, Tok) and li.row_dims == 1:
                return li  # per-row gather from a weight table (by expert id)
            if isinstance(ls, Tok) and ls.perm is None and ls.row_dims == 1:
                if isinstance(li, Perm) and li.m == ls.m:
                    return Tok(li.m, li.key)
                if isinstance(li, RowIdx) and li.target == ls.m:
                    return Tok(li.m, li.key)
            if isinstance(ls, Tok) and ls.perm is not None and isinstance(li, InvPerm) and li.key is ls.perm and li.m == ls.m:
                return Tok(ls.m)
            raise NotTokenwise(f"indexing {self._describe(ls)} by a tensor that is not a routing permutation")
        if isinstance(ls, Tok):
            items = idx if isinstance(idx, tuple) else (idx,)
            if items and items[0] is Ellipsis and len(items) == 2 and isinstance(items[1], (slice, int)) and ls.row_dims == 1:
                val = example_value(src)
                if isinstance(val, torch.Tensor) and val.dim() > 1:
                    return ls
            if ls.row_dims == 1 and items and items[0] == slice(None) and all(isinstance(i, (slice, int)) or i is None for i in items[1:]):
                return ls
            raise NotTokenwise(f"indexing `{idx}` selects rows")
        raise NotTokenwise(f"getitem on {self._describe(ls)}")

    def _setitem(self, node: fx.Node) -> Any:
        buf, idx, value = node.args
        lb, li, lv = self.of(buf), self.of(idx), self.of(value)
        if isinstance(lb, EmptyLike) and isinstance(li, Perm) and li.key is lb.key and isinstance(lv, Arange) and lv.m == li.m:
            self.layouts[buf] = InvPerm(lb.key, lb.m)  # buf[perm] = arange: buf is now perm's inverse
            return NoValue()
        raise NotTokenwise("an in-place index write that is not the inverse of a routing permutation")

    def _sort(self, node: fx.Node) -> Any:
        src = self.of(node.args[0])
        val = example_value(node.args[0])
        if not (isinstance(src, Tok) and src.perm is None and src.row_dims == 1 and isinstance(val, torch.Tensor) and val.dim() == 1):
            raise NotTokenwise(f"op `{op_name(node)}` over {self._describe(src)}")
        if node.kwargs.get("descending") or (len(node.args) > 2 and node.args[2]):
            raise NotTokenwise("descending sort")
        if op_name(node) == "argsort":
            return Perm(src.m, node)
        return Tuple((Tok(src.m, node), Perm(src.m, node)))

    def _histc(self, node: fx.Node) -> Any:
        src = self.of(node.args[0])
        if isinstance(src, Tok) and src.perm is not None and src.m and self._sorted_keys(node.args[0]):
            names = ("bins", "min", "max")
            given = dict(zip(names, node.args[1:]), **{k: v for k, v in node.kwargs.items() if k in names})
            return Counts(src.perm, (given.get("bins", 100), given.get("min", 0), given.get("max", 0)))
        raise NotTokenwise("op `histc` over token data other than sorted expert ids")

    def _sorted_keys(self, node: Any) -> bool:
        """``node`` is the values of a sort (possibly cast): its rows are ascending."""
        while isinstance(node, fx.Node) and op_name(node) in ("float", "to", "int", "long"):
            node = node.args[0]
        return (
            isinstance(node, fx.Node) and node.target is operator.getitem and node.args[1] == 0
            and isinstance(node.args[0], fx.Node) and op_name(node.args[0]) == "sort"
        )

    def _grouped(self, node: fx.Node) -> Any:
        x, w = node.args[0], node.args[1]
        offs = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
        lx, lw, lo = self.of(x), self.of(w), self.of(offs)
        if isinstance(lx, Tok) and lx.perm is not None and isinstance(lw, Ext) and isinstance(lo, Offsets) and lo.key is lx.perm:
            experts = example_value(w).shape[0] if isinstance(example_value(w), torch.Tensor) else None
            if lo.bins != (experts, 0, (experts or 0) - 1):
                raise NotTokenwise(f"a grouped matmul over {experts} experts whose groups were counted with histc{lo.bins}")
            self.experts.add(node)
            return lx
        raise NotTokenwise("a grouped matmul whose groups are not the sorted rows of its input")

    def _bmm(self, node: fx.Node) -> Any:
        a, b = node.args[0], node.args[1]
        la, lb = self.of(a), self.of(b)
        if isinstance(la, Tok) and la == lb and la.row_dims == 1:
            self.experts.add(node)  # a per-row product with gathered expert weights
            return la
        raise NotTokenwise(f"op `{op_name(node)}` between tensors of different rows")

    def _view(self, node: fx.Node) -> Any:
        src_node = node.args[0]
        src = self.of(src_node)
        sv, ov = example_value(src_node), example_value(node)
        if not isinstance(src, Tok) or not isinstance(sv, torch.Tensor) or not isinstance(ov, torch.Tensor):
            raise NotTokenwise(f"op `{op_name(node)}` on {self._describe(src)}")
        per_token = src.m * math.prod(sv.shape[src.row_dims:])
        shape = list(ov.shape)
        # rows in dim 0
        if shape and shape[0] % self.T == 0:
            m = shape[0] // self.T
            if m and m * math.prod(shape[1:]) == per_token and (src.perm is None or (m == src.m and src.row_dims == 1)):
                return Tok(m, src.perm)
        # [batch, seq, ...]: token dims in dims 0 and 1 (natural order only)
        if len(shape) >= 2 and shape[0] * shape[1] == self.T and math.prod(shape[2:]) == per_token and src.perm is None:
            return Tok(1, None, 2)
        raise NotTokenwise(f"op `{op_name(node)}` regroups rows across tokens")

    def _expand(self, node: fx.Node) -> Any:
        """``x.expand(-1, ...)``: broadcasts within each row, keeps the rows where they are."""
        src, val = self.of(node.args[0]), example_value(node.args[0])
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if (isinstance(src, Tok) and src.row_dims == 1 and isinstance(val, torch.Tensor)
                and len(sizes) == val.dim() and sizes[0] == -1):
            return src
        raise NotTokenwise("op `expand` other than within each row (-1 for the rows)")

    def _generic(self, node: fx.Node) -> Any:
        name = op_name(node)
        val = example_value(node)
        toks = [l for l in (self.of(a) for a in list(node.args) + list(node.kwargs.values())) if isinstance(l, Tok)]
        others = [l for l in (self.of(a) for a in list(node.args) + list(node.kwargs.values()))
                  if not isinstance(l, (Tok, Ext))]
        if others:
            raise NotTokenwise(f"op `{name}` on routing indices")
        if not toks:
            return EXT
        first = toks[0]
        if any(t != first for t in toks[1:]):
            raise NotTokenwise(f"op `{name}` combines tensors whose rows differ")
        verdict_dims = _dim_ops.get(name.rstrip("_"))
        if verdict_dims is not None:
            pos = verdict_dims
            dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else None)
            if name in ("topk",) and dim is None:
                dim = -1
            if name in ("chunk", "split") and dim is None:
                dim = 0
            self._along_features(node, first, dim, name)
            if name in ("sum", "mean", "amax", "amin") and node.kwargs.get("keepdim", False) is False and first.row_dims != 1:
                raise NotTokenwise(f"op `{name}` on a [batch, seq, ...] tensor")
            if isinstance(val, (tuple, list)):
                return Tuple(tuple(first for _ in val))
            return first
        if name in _LIKE:
            return first
        if (node.op == "call_function" and node.target in rowwise.ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and (name in rowwise.ELEMENTWISE_METHODS or name.rstrip("_") in rowwise.ELEMENTWISE_METHODS)
        ):
            self._check_broadcast(node, first)
            return first
        if node.op == "call_function" and node.target in rowwise.DROPOUT_FUNCTIONS:
            if node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False):
                raise NotTokenwise("in-place dropout")
            return first  # in training its masks are replayed: the region's generator state is kept
        raise NotTokenwise(f"op `{name}` is not known to keep tokens apart")

    def _check_broadcast(self, node: fx.Node, tok: Tok) -> None:
        out = example_value(node)
        if not isinstance(out, torch.Tensor):
            raise NotTokenwise(f"op `{op_name(node)}` does not return a tensor")
        for a in list(node.args) + list(node.kwargs.values()):
            if not isinstance(a, fx.Node) or not isinstance(self.of(a), Ext):
                continue
            v = example_value(a)
            if isinstance(v, torch.Tensor) and v.dim() > out.dim() - tok.row_dims:
                lead = v.shape[: v.dim() - (out.dim() - tok.row_dims)]
                if any(s != 1 for s in lead):
                    raise NotTokenwise(f"op `{op_name(node)}`: `{a.name}` {tuple(v.shape)} varies over the token rows")


# op -> position of its dim argument (x in args[0] for both spellings)
_dim_ops = {
    "softmax": 1, "log_softmax": 1, "topk": 2, "sum": 1, "mean": 1, "amax": 1, "amin": 1,
    "chunk": 2, "split": 2, "scatter": 1, "gather": 1, "cumsum": 1, "cumprod": 1, "sort": 1,
}


_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_empty"}


def _raise(msg: str):
    raise NotTokenwise(msg)
