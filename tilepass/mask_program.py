"""Find SDPA attention sites and express their masks as flex-attention ``mask_mod``s.

transformers' masking utilities build a boolean mask ``[B, 1, Q, KV]`` from broadcast
index tensors (``arange(n)[None, None, :, None]``...), comparisons (causal, sliding
window), and gathers from data (``attention_mask[batch_idx, kv_idx]`` for padding,
document ids for packed sequences). Such a mask is a pointwise function of
``(b, h, q_idx, kv_idx)``. :func:`lift_mask` proves that op by op and copies the
computation into a *mask program* ``fn(b, h, q_idx, kv_idx, *data) -> bool``: evaluated
at every index it gives the dense mask exactly, so a ``BlockMask`` built from it has the
same semantics, and the dense O(seq²) construction leaves the graph.

The attention sites that read such masks are found in :mod:`tilepass.match_attention`.
Knows nothing of flex's runtime; only judges and copies.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .fx_utils import arg_nodes, example_value, op_name
from .mask_constants import constant_data, constant_tensor, eval_constant, is_device_move


_POINTWISE_FUNCTIONS = {
    operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.invert, operator.sub, operator.add, operator.mul, operator.floordiv, operator.mod, operator.neg,
    torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.where, torch.abs, torch.remainder, torch.sub, torch.add,
}
_POINTWISE_METHODS = {"le", "lt", "ge", "gt", "eq", "ne", "logical_and", "logical_or", "logical_not", "__and__",
                      "__or__", "__invert__", "sub", "add", "abs", "to", "bool", "int", "long",
                      # operators some Dynamo versions record as methods (torch 2.11 on CUDA: ``__eq__``)
                      "__eq__", "__ne__", "__le__", "__lt__", "__ge__", "__gt__", "__add__", "__sub__", "__mul__",
                      "__floordiv__", "__mod__", "__neg__", "__xor__"}
# ... or as calls of the Tensor dunder itself
_POINTWISE_FUNCTIONS |= {getattr(torch.Tensor, m) for m in _POINTWISE_METHODS if m.startswith("__")}
_IDENTITY_METHODS = {"expand", "expand_as", "contiguous"}
_DIMS = ("b", "h", "q_idx", "kv_idx")


@dataclasses.dataclass
class MaskProgram:
    program: fx.GraphModule  # fn(b, h, q_idx, kv_idx, *data) -> bool tensor
    data: list[fx.Node]  # graph values the mask reads (e.g. the 2-D attention_mask)
    uses: frozenset[str]  # which of b, h, q_idx, kv_idx it depends on
    # the length of the arange each used index was built from: the program holds for
    # indices below it, so the attention must not be longer (a length-1 arange broadcasts)
    extent: dict[str, Any] = dataclasses.field(default_factory=dict)

    def broadcast_dims(self, sizes: dict[str, Any]) -> list[str]:
        """The used dims whose arange is not as long as the attention's ``sizes`` there."""
        return [d for d in sorted(self.uses) if d in self.extent and not same_size(self.extent[d], sizes[d])]


def same_size(a: Any, b: Any) -> bool:
    """Provably equal sizes, static or symbolic (the same symbol), without a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr


class NotPointwise(Exception):
    pass


Resolve = Callable[[fx.Node], "fx.Node | None"]


def _index_leaf(node: fx.Node) -> tuple[int, Any] | None:
    """``arange(n)[None, None, :, None]`` (optionally ``+ offset`` before indexing): (dim, offset).
    Only an int64 arange: a narrower one wraps, and its values are no longer the index."""
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    src, idx = node.args
    if not isinstance(idx, tuple) or len(idx) != 4:
        return None
    full = [i for i, s in enumerate(idx) if s == slice(None)]
    if len(full) != 1 or any(s is not None for i, s in enumerate(idx) if i != full[0]):
        return None
    offset = 0
    if op_name(src) == "add" and isinstance(src.args[1], int) and src.args[1] >= 0 and isinstance(src.args[0], fx.Node) \
            and not src.kwargs:  # torch.add(x, c, alpha=2) is x + 2c
        src, offset = src.args[0], src.args[1]  # a negative offset would wrap around in a dense gather
    if op_name(src) != "arange" or len(src.args) != 1 or getattr(example_value(src), "dtype", None) != torch.int64:
        return None
    return full[0], offset


def lift_mask(mask: fx.Node, resolve: Resolve | None = None) -> MaskProgram:
    """Copy the construction of a boolean ``[B, H, Q, KV]`` mask into a pointwise mask program.

    ``resolve`` maps a placeholder of a nested body (a checkpointed layer) to the outer
    value it is, so a mask built outside the layer is followed to where it is built; the
    program's ``data`` may then live in an outer graph."""
    value = example_value(mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise NotPointwise(f"the mask is a {getattr(value, 'dtype', type(value).__name__)} tensor (an additive mask), not a boolean one")
    if value.dim() != 4:
        raise NotPointwise(f"the mask has {value.dim()} dims, not [B, H, Q, KV]")
    order: list[fx.Node] = []
    leaves: dict[fx.Node, tuple[int, Any]] = {}
    data: list[fx.Node] = []
    seen: set[fx.Node] = set()

    alias: dict[fx.Node, fx.Node] = {}
    rank: dict[fx.Graph, int] = {mask.graph: 0}  # outer graphs run first

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        outer = resolve(n) if resolve is not None and n.op == "placeholder" else None
        if outer is not None:
            alias[n] = outer
            rank.setdefault(outer.graph, rank[n.graph] - 1)
            visit(outer)
            return
        leaf = _index_leaf(n)
        if leaf is not None:
            leaves[n] = leaf
            return
        if n.target is operator.getitem and isinstance(n.args[1], tuple) and all(
            isinstance(i, fx.Node) for i in n.args[1]
        ):
            # data[b_idx, kv_idx]: a gather from a value computed outside the mask
            for i in n.args[1]:
                visit(i)
                if i not in leaves:
                    raise NotPointwise("the mask gathers with indices that are not positions")
            if n.args[0] not in data:
                data.append(n.args[0])
            order.append(n)
            return
        if n.op == "call_method" and n.target == "new_ones" and n.args[1:] in ((), ((),)):
            order.append(n)  # a scalar True
            for a in arg_nodes(n):
                visit(a)
            return
        pointwise = (n.op == "call_function" and n.target in _POINTWISE_FUNCTIONS) or (
            n.op == "call_method" and (n.target in _POINTWISE_METHODS or n.target in _IDENTITY_METHODS)
        )
        if not pointwise:
            raise NotPointwise(f"the mask is built by `{op_name(n)}`, which is not pointwise in (b, h, q, kv)")
        if n.op == "call_method" and n.target == "to" and any(
                isinstance(a, torch.dtype) and a.is_floating_point for a in (*n.args, n.kwargs.get("dtype"))):
            raise NotPointwise("the mask goes through a float tensor")
        if n.op == "call_method" and n.target in _IDENTITY_METHODS:
            visit(n.args[0])  # expand(2, -1, s0, s0): the sizes (symbolic under dynamic shapes) are not mask values
            order.append(n)
            return
        for a in arg_nodes(n):
            visit(a)
        order.append(n)

    visit(mask)
    if not leaves:
        raise NotPointwise("the mask does not depend on positions (a mask passed in from outside)")
    # Data computed from constants alone needs no memory reads in the mask_mod when it is
    # equal everywhere (the document ids transformers derives from positions that are an
    # arange: no packing) or is the position itself (those positions): its gathers become
    # a constant or the index they read at. What is left is then plain causal / windowed.
    folded = {d: c for d in data if (c := constant_data(resolved(d, resolve))) is not None}
    data = [d for d in data if d not in folded]
    graph = fx.Graph()
    idx = [graph.placeholder(d) for d in _DIMS]
    env: dict[fx.Node, Any] = {}
    extent: dict[str, Any] = {}
    for leaf, (dim, offset) in leaves.items():
        env[leaf] = idx[dim] if not offset else graph.call_function(operator.add, (idx[dim], offset))
        length = example_value(leaf).shape[dim]
        if _DIMS[dim] in extent and not same_size(extent[_DIMS[dim]], length):
            raise NotPointwise(f"the mask's {_DIMS[dim]} positions come from aranges of different lengths")
        extent[_DIMS[dim]] = length
    for i, d in enumerate(data):
        env[d] = graph.placeholder(f"data{i}")
    position = {n: (rank[g], i) for g in rank for i, n in enumerate(g.nodes)}

    def value(m: fx.Node) -> Any:
        return env[alias.get(m, m)]

    def as_tensor(v: Any) -> Any:  # a Python constant where the program needs a tensor
        return v if isinstance(v, fx.Node) else constant_tensor(graph, idx[2], v)

    for n in sorted(order, key=position.__getitem__):
        if n.op == "call_method" and (n.target in _IDENTITY_METHODS or is_device_move(n)):
            env[n] = value(n.args[0])  # the mask_mod's indices are on the kernel's device already
            continue
        if n.op == "call_method" and n.target == "new_ones" and n.kwargs.get("dtype") is torch.bool:
            env[n] = True  # and_masks' start value: a Python True, folded away by the ``&`` below
            continue
        if n.target is operator.getitem and n.args[0] in folded:
            kind, c = folded[n.args[0]]  # a uniform constant stays a Python value, propagated below
            index = value(n.args[1][-1])  # "position": data[b, i] is i + c
            env[n] = c if kind == "uniform" else index if c == 0 else graph.call_function(operator.add, (index, c))
            continue
        args, kwargs = fx.node.map_arg(n.args, value), fx.node.map_arg(n.kwargs, value)
        inputs = [value(m) for m in arg_nodes(n)]
        constant = bool(inputs) and not any(isinstance(v, fx.Node) for v in inputs)
        if constant:
            c = eval_constant(n, args)
            if c is not None:
                env[n] = c
                continue
        if _is_and(n) and len(args) == 2 and any(a is True for a in args):
            other = 1 if args[0] is True else 0
            if getattr(example_value(n.args[other]), "dtype", None) == torch.bool:
                env[n] = as_tensor(args[other])  # x & True is x, for a bool x (an int x & 1 keeps its low bit)
                continue
        args = tuple(as_tensor(a) if _keeps_tensor(n, constant, i, a) else a for i, a in enumerate(args))
        env[n] = graph.create_node(n.op, n.target, args, kwargs, name=n.name)
    graph.output(as_tensor(value(mask)))
    uses = frozenset(p.name for p in idx if p.users)
    return MaskProgram(fx.GraphModule(torch.nn.Module(), graph, class_name="MaskProgram"), data, uses,
                       {d: n for d, n in extent.items() if d in uses})


def _keeps_tensor(n: fx.Node, all_folded: bool, i: int, a: Any) -> bool:
    """Does argument ``i`` of ``n``, ``a`` in the mask program, have to be a tensor? Where
    torch saw a tensor, the program keeps one: a method's self; the first input of an op
    whose inputs all folded but which did not fold itself (torch's dtype rules compute it,
    not Python's); a folded value passed to an op that takes no Python scalar there
    (``torch.logical_and(x, True)``, ``x.logical_and(1)``)."""
    if isinstance(a, fx.Node):
        return False
    if i == 0 and (all_folded or n.op == "call_method"):
        return True
    torch_op = n.op == "call_method" or getattr(n.target, "__module__", None) != "_operator"
    return torch_op and isinstance(a, (bool, int)) and i < len(n.args) and isinstance(n.args[i], fx.Node)


# kv_idx <= q_idx, spelled as Dynamo may record it: (op, kv side first?)
_LE_FORMS = {"le": True, "__le__": True, "ge": False, "__ge__": False}


def is_plain_causal(mask: MaskProgram) -> bool:
    """Is the program exactly ``kv_idx <= q_idx``: no data, no offsets, nothing else?

    Then, with as many queries as keys, it is what SDPA's ``is_causal=True`` computes (its
    causal mask is aligned top-left), and SDPA's fused kernels can run it."""
    if mask.data:
        return False
    graph = mask.program.graph
    index = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    [out] = [n.args[0] for n in graph.nodes if n.op == "output"]
    if len(body) != 1 or body[0] is not out or len(out.args) != 2 or out.kwargs:
        return False
    kv_first = _LE_FORMS.get(op_name(out))
    if kv_first is None or out.op not in ("call_function", "call_method"):
        return False
    want = (index["kv_idx"], index["q_idx"]) if kv_first else (index["q_idx"], index["kv_idx"])
    return tuple(out.args) == want


_AND_FUNCTIONS = {operator.and_, torch.logical_and, torch.Tensor.__and__, torch.Tensor.logical_and}


def _is_and(n: fx.Node) -> bool:
    """``a & b`` in each spelling Dynamo records (torch 2.11 on CUDA: Tensor dunders)."""
    return (n.op == "call_function" and n.target in _AND_FUNCTIONS) or (
        n.op == "call_method" and n.target in ("__and__", "logical_and"))


def resolved(n: fx.Node, resolve: Resolve | None) -> fx.Node:
    while resolve is not None and n.op == "placeholder" and resolve(n) is not None:
        n = resolve(n)
    return n
