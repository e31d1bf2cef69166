"""Find SDPA attention sites and express their masks as flex-attention ``mask_mod``s.

transformers' masking utilities build a boolean mask ``[B, 1, Q, KV]`` from broadcast
index tensors (``arange(n)[None, None, :, None]``...), comparisons (causal, sliding
window), and gathers from data (``attention_mask[batch_idx, kv_idx]`` for padding,
document ids for packed sequences). Such a mask is a pointwise function of
``(b, h, q_idx, kv_idx)``. :func:`lift_mask` proves that op by op and copies the
computation into a *mask program* ``fn(b, h, q_idx, kv_idx, *data) -> bool``: evaluated
at every index it gives the dense mask exactly, so a ``BlockMask`` built from it has the
same semantics, and the dense O(seq²) construction leaves the graph.

Anything else (an additive float mask, dropout, a mask read from a graph input) is left
on SDPA with the reason. Knows nothing of flex's runtime; only judges and copies.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import arg_nodes, common_module, example_value, mutates, op_name

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


@dataclasses.dataclass
class AttentionSite:
    node: fx.Node  # the scaled_dot_product_attention call (or the eager form's last matmul)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    enable_gqa: bool
    causal: bool
    mask: MaskProgram | None
    module: str
    pattern: str
    softcap: float | None = None  # tanh(score / c) * c before the mask (Gemma 2)
    replaced: tuple = ()  # eager form: the nodes between q/k/v and the output
    sinks: fx.Node | None = None  # [H] extra logit per head, normalised with the keys then dropped (GPT-OSS)


@dataclasses.dataclass
class AttentionRejection:
    node: fx.Node
    reason: str
    module: str
    pattern: str = "sdpa"


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
    folded = {d: c for d in data if (c := _constant_data(_resolved(d, resolve))) is not None}
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
        return v if isinstance(v, fx.Node) else _constant_tensor(graph, idx[2], v)

    for n in sorted(order, key=position.__getitem__):
        if n.op == "call_method" and (n.target in _IDENTITY_METHODS or _is_device_move(n)):
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
            c = _eval_constant(n, args)
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


def _is_device_move(n: fx.Node) -> bool:
    """``x.to(device)`` or ``x.to(device=...)``: a move, neither a dtype change nor a copy that matters."""
    if n.target != "to":
        return False
    kwargs = dict(n.kwargs)
    devices = [*n.args[1:], *([kwargs.pop("device")] if "device" in kwargs else [])]
    return bool(devices) and all(isinstance(a, (torch.device, str)) for a in devices) and set(kwargs) <= {"non_blocking"}


_AND_FUNCTIONS = {operator.and_, torch.logical_and, torch.Tensor.__and__, torch.Tensor.logical_and}


def _is_and(n: fx.Node) -> bool:
    """``a & b`` in each spelling Dynamo records (torch 2.11 on CUDA: Tensor dunders)."""
    return (n.op == "call_function" and n.target in _AND_FUNCTIONS) or (
        n.op == "call_method" and n.target in ("__and__", "logical_and"))


# Binary ops folded on Python constants, by the name Dynamo records them under: operator
# functions, Tensor methods and Tensor dunders (``__eq__`` on torch 2.11 CUDA) alike.
_COMPARE = {"eq": operator.eq, "ne": operator.ne, "le": operator.le, "lt": operator.lt, "ge": operator.ge,
            "gt": operator.gt, "and": operator.and_, "or": operator.or_, "xor": operator.xor}
_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
               "mod": operator.mod}


def _eval_constant(n: fx.Node, args: tuple) -> bool | int | None:
    """``n`` evaluated on Python constants (``0 == 0``, ``True.to(device)``), or None.

    Folded values are bools and int64s only, with torch's meaning: a cast to any other dtype,
    a float, bool arithmetic (``True + True`` is 2 in Python, True in torch), a result
    outside int64 (torch wraps) or a division by zero is not folded."""
    if any(isinstance(a, float) for a in args):
        return None
    if n.op == "call_method" and n.target == "to":
        dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), n.kwargs.get("dtype"))
        out = args[0] if dtype is None else bool(args[0]) if dtype == torch.bool else \
            int(args[0]) if dtype == torch.int64 else None
    elif n.op == "call_method" and n.target in ("bool", "long"):
        out = bool(args[0]) if n.target == "bool" else int(args[0])
    elif n.op not in ("call_method", "call_function") or len(args) != 2 or n.kwargs:
        return None
    else:
        name = (n.target if n.op == "call_method" else getattr(n.target, "__name__", "")).strip("_")
        try:
            if name in _COMPARE:
                out = _COMPARE[name](*args)
            elif name in _ARITHMETIC and not any(isinstance(a, bool) for a in args):
                out = _ARITHMETIC[name](*args)
            else:
                return None
        except (ZeroDivisionError, TypeError):
            return None
    if isinstance(out, bool):
        return out
    return out if isinstance(out, int) and -2**63 <= out < 2**63 else None


def _resolved(n: fx.Node, resolve: Resolve | None) -> fx.Node:
    while resolve is not None and n.op == "placeholder" and resolve(n) is not None:
        n = resolve(n)
    return n


# Ops that compute position and document ids in transformers' masking code; anything else
# is not evaluated at compile time.
_CONSTANT_OPS = {"arange", "add", "sub", "mul", "floordiv", "neg", "unsqueeze", "getitem", "diff", "ne", "eq",
                 "lt", "le", "gt", "ge", "cumsum", "expand", "to", "view", "reshape", "ones", "zeros", "full",
                 "new_ones", "new_zeros", "ones_like", "zeros_like", "full_like", "clone", "contiguous", "int",
                 "long", "bool", "__and__", "__or__", "__eq__", "__ne__", "__add__", "__sub__", "__mul__"}


def _constant_data(node: fx.Node) -> tuple[str, Any] | None:
    """``("uniform", c)`` if ``node`` is computed from constants alone (no graph input, no
    randomness, static shapes) and every element is ``c``; ``("position", offset)`` if it is
    ``[B, S]`` with ``value[b, i] == i + offset`` in every row; else None."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    if not all(isinstance(s, int) for s in value.shape):
        return _symbolic_constant_data(node)
    if value.numel() == 0:
        return None
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n.op not in ("call_function", "call_method") or op_name(n) not in _CONSTANT_OPS:
            return False
        if not all(visit(a) for a in arg_nodes(n)):
            return False
        order.append(n)
        return True

    if not visit(node) or len(order) > 64 or _written_later(order):
        return None
    env: dict[fx.Node, Any] = {}
    try:
        for n in order:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            env[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # anything that does not evaluate plainly is not treated as a constant
        return None
    out = env[node]
    if not isinstance(out, torch.Tensor) or out.numel() == 0 or out.dtype not in (torch.bool, torch.int64):
        return None  # a narrower or float dtype: its Python value would not behave as it does
    first = out.reshape(-1)[0]
    if bool((out == first).all()):
        return "uniform", first.item()
    if out.dim() == 2 and out.dtype == torch.int64:
        offset = out[0, 0].item()
        if torch.equal(out, (torch.arange(out.shape[1], device=out.device) + offset).expand_as(out)):
            return "position", offset
    return None


def _symbolic_constant_data(node: fx.Node) -> tuple[str, Any] | None:
    """:func:`_constant_data` for a symbolic length, where nothing can be evaluated: the same
    two facts, proved op by op on the abstract values ``("uniform", c)`` (every element is
    c) and ``("position", off)`` (``value[..., i] == i + off`` along the last dim, the same
    in every row). Covers how transformers derives positions and document ids from an
    ``arange`` (``cumsum(diff(pos, prepend=pos[:, :1] - 1) != 1)``); anything else is None."""
    memo: dict[fx.Node, tuple[str, Any] | None] = {}
    order: list[fx.Node] = []

    def dims(n: fx.Node) -> int | None:
        v = example_value(n)
        return v.dim() if isinstance(v, torch.Tensor) else None

    def abstract(n: Any) -> tuple[str, Any] | None:
        if not isinstance(n, fx.Node):
            return ("uniform", n) if isinstance(n, (bool, int)) else None
        if n not in memo:
            memo[n] = None  # cycles cannot happen in a graph, but a failed visit stays None
            order.append(n)
            memo[n] = _abstract_step(n, abstract, dims)
            if memo[n] is not None and memo[n][0] == "position" and _static_last_dim(n) == 1:
                memo[n] = ("uniform", memo[n][1])  # one position per row: the same value everywhere
        return memo[n]

    out = abstract(node)
    if out is None or _written_later(order) or getattr(example_value(node), "dtype", None) not in (torch.bool, torch.int64):
        return None
    return out if out[0] == "uniform" or dims(node) == 2 else None


_INT_DTYPES = (None, torch.int64)  # a narrower arange wraps: its values are not the index


def _abstract_step(n: fx.Node, abstract: Callable, dims: Callable) -> tuple[str, Any] | None:
    """One op of :func:`_symbolic_constant_data` on abstract values (None: not provable)."""
    name = op_name(n)
    if n.op not in ("call_function", "call_method"):
        return None
    value = example_value(n)
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.bool, torch.int64):
        return None  # every step in bool or int64: no float, no wrap-around
    if name == "arange":
        if len(n.args) not in (1, 2) or n.kwargs.get("dtype") not in _INT_DTYPES or n.kwargs.get("step", 1) != 1 \
                or set(n.kwargs) - {"dtype", "device", "step"} or value.dtype == torch.bool:
            return None
        start = n.args[0] if len(n.args) == 2 else 0  # the end is a size: any (symbolic) int
        return ("position", start) if isinstance(start, int) and not isinstance(start, bool) else None
    if not n.args or not isinstance(n.args[0], fx.Node) or dims(n.args[0]) is None:
        return None
    x = abstract(n.args[0])
    if x is None:
        return None
    kind, c = x
    last = dims(n.args[0]) - 1  # the input's last dim, as a non-negative index
    if name in ("clone", "contiguous") or _is_device_move(n):
        return x
    if kind == "uniform" and not any(isinstance(a, fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
        folded = _eval_constant(n, (c, *n.args[1:]))  # one element's value: the same rules as in lift_mask
        if folded is not None:
            return "uniform", folded
    if name in ("add", "__add__", "sub", "__sub__") and len(n.args) == 2 and not n.kwargs and kind == "position":
        other = n.args[1]
        if isinstance(other, bool) or not isinstance(other, int):
            return None
        c = c + other if name.strip("_") == "add" else c - other
        return (kind, c) if abs(c) < 2**62 else None  # far from int64's wrap-around, whatever the length
    if name == "unsqueeze":
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        rank = dims(n.args[0])
        keeps_last = isinstance(d, int) and rank is not None and d not in (-1, rank)
        return x if kind == "uniform" or keeps_last else None
    if name == "expand":
        sizes = n.args[1:] if len(n.args) > 2 or not isinstance(n.args[1], (tuple, list)) else n.args[1]
        return x if kind == "uniform" or (sizes and sizes[-1] == -1) else None
    if name == "getitem" and isinstance(n.args[1], tuple) and all(isinstance(i, slice) for i in n.args[1]):
        idx = n.args[1]
        if kind == "uniform":
            return x
        prefix = idx[-1].start in (None, 0) and idx[-1].step in (None, 1)
        whole = all(i == slice(None) for i in idx[:-1])
        return x if len(idx) == dims(n.args[0]) and prefix and whole else None
    if name == "diff" and len(n.args) == 1 and set(n.kwargs) <= {"dim", "prepend"} and n.kwargs.get("dim", -1) in (-1, last):
        if kind != "position":
            return None
        if "prepend" not in n.kwargs:
            return ("uniform", 1)
        before = abstract(n.kwargs["prepend"])
        ok = before == ("uniform", c - 1) and _static_last_dim(n.kwargs["prepend"]) == 1
        return ("uniform", 1) if ok else None  # pos[0] - (pos[0] - 1), then pos[i] - pos[i-1]: all 1
    if name == "cumsum" and kind == "uniform" and c in (0, False):
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return ("uniform", 0) if d in (-1, last) else None
    if kind == "position" and (name == "long" or (name == "to" and len(n.args) == 2 and n.args[1] == torch.int64)):
        return x  # int64 already (every step is): the cast changes nothing
    return None


def _static_last_dim(n: fx.Node) -> Any:
    v = example_value(n)
    return v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _written_later(nodes: list[fx.Node]) -> bool:
    """Is any of ``nodes``, or anything computed from them (a view may alias), written in
    place somewhere in the graph? Then their values at compile time prove nothing."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for u in todo.pop().users:
            if mutates(u):
                return True
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _constant_tensor(graph: fx.Graph, index: fx.Node, value: bool | int | float) -> fx.Node:
    """``value`` as a tensor broadcastable like ``index``, by index arithmetic alone (what a
    mask_mod can hold)."""
    if isinstance(value, bool):
        return graph.call_function(operator.eq if value else operator.ne, (index, index))
    return graph.call_function(operator.add, (graph.call_function(operator.mul, (index, 0)), value))


def find_attention(graph: fx.Graph, resolve: Resolve | None = None) -> tuple[list[AttentionSite], list[AttentionRejection]]:
    """Every attention site of ``graph`` that flex attention can express, and the rest
    with reasons. ``resolve``: see :func:`lift_mask`."""
    sites, rejections = [], []
    for n in graph.nodes:
        eager = _eager_attention(n, resolve)
        if isinstance(eager, AttentionSite):
            sites.append(eager)
            continue
        if isinstance(eager, AttentionRejection):
            rejections.append(eager)
            continue
        if not (n.op == "call_function" and n.target is F.scaled_dot_product_attention):
            continue
        module = common_module([n])
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        kw = dict(zip(names, n.args), **n.kwargs)
        q, k, v = kw["query"], kw["key"], kw["value"]
        reason = None
        if kw.get("dropout_p", 0.0) not in (0, 0.0):
            reason = f"attention dropout p={kw['dropout_p']}: flex attention has no dropout"
        elif any(not isinstance(example_value(t), torch.Tensor) or example_value(t).dim() != 4 for t in (q, k, v)):
            reason = "query/key/value are not [B, H, S, D] tensors"
        mask = None
        causal = bool(kw.get("is_causal", False))
        if reason is None and kw.get("attn_mask") is not None:
            if causal:
                reason = "both a mask and is_causal"
            else:
                try:
                    mask = lift_mask(kw["attn_mask"], resolve)
                except NotPointwise as e:
                    reason = str(e)
        reason = reason or _broadcast_reason(mask, q, k)
        if reason is not None:
            rejections.append(AttentionRejection(n, reason, module))
            continue
        pattern = "causal" if causal else ("full" if mask is None else "mask(" + ",".join(sorted(mask.uses)) + ")")
        (k0, k_rep), (v0, v_rep) = _unrepeat_kv(k), _unrepeat_kv(v)
        if k_rep and v_rep:  # repeat_kv'd: flex reads the shared kv heads itself (GQA)
            k, v = k0, v0
        sites.append(AttentionSite(n, q, k, v, kw.get("scale"), bool(kw.get("enable_gqa", False)) or (k_rep and v_rep),
                                   causal, mask, module, pattern))
    return sites, rejections


# --- the eager form: softmax(q @ k^T * scale [softcap] + mask) @ v ------------------------

_MIN_MASK_VALUE = -1e30  # "masked" in an additive mask: exp(score + this) is 0 in fp32/bf16


def _broadcast_reason(mask: MaskProgram | None, q: fx.Node, k: fx.Node) -> str | None:
    """Why the lifted program would not hold at every (b, h, q, kv) of this attention: an
    index it uses came from a shorter arange, whose mask broadcasts (one row for all)."""
    if mask is None:
        return None
    qv, kv = example_value(q), example_value(k)
    dims = mask.broadcast_dims(dict(b=qv.shape[0], h=qv.shape[1], q_idx=qv.shape[2], kv_idx=kv.shape[2]))
    return (f"the mask's {', '.join(dims)} positions come from a shorter arange than the attention's length "
            "(the dense mask broadcasts)") if dims else None


def _is_call(n: Any, *names: str) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and op_name(n) in names


def _unrepeat_kv(n: fx.Node) -> tuple[fx.Node, bool]:
    """k from transformers' ``repeat_kv(k)`` (getitem None -> expand -> reshape): (k, repeated)."""
    if _is_call(n, "reshape") and _is_call(n.args[0], "expand") and n.args[0].args[0].target is operator.getitem:
        g = n.args[0].args[0]
        idx = g.args[1]
        if isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None and all(i == slice(None) for i in idx[:2] + idx[3:]):
            return g.args[0], True
    return n, False


def _const(n: Any) -> float | None:
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def _eager_attention(out: fx.Node, resolve: Resolve | None):
    """Match ``matmul(dropout(softmax(scores).to(dtype)), v)`` back to ``q @ k^T``."""
    if not _is_call(out, "matmul") or len(out.args) != 2:
        return None
    p, vr = out.args
    chain = [out]
    while _is_call(p, "dropout", "to", "float", "type"):
        if op_name(p) == "dropout":
            prob = p.kwargs.get("p", p.args[1] if len(p.args) > 1 else 0.5)
            training = p.kwargs.get("training", p.args[2] if len(p.args) > 2 else True)
            if training and prob:
                return AttentionRejection(out, f"attention dropout p={prob}: flex attention has no dropout",
                                          common_module([out]), "eager")
        chain.append(p)
        p = p.args[0]
    module = common_module([out])
    sinks = None
    if p.target is operator.getitem and _is_call(p.args[0], "softmax") and isinstance(p.args[1], tuple) \
            and p.args[1][-1] == slice(None, -1):
        found = _sinks(p.args[0])
        if isinstance(found, str):
            return AttentionRejection(out, found, module, "eager")
        sinks, s, sink_nodes = found
        chain += [p, *sink_nodes]
    elif not _is_call(p, "softmax") or _softmax_dim(p) not in (-1, 3):
        return None
    else:
        chain.append(p)
        s = p.args[0]
    mask = None
    if _is_call(s, "add") and len(s.args) == 2 and isinstance(s.args[1], fx.Node):
        chain.append(s)
        s, additive = s.args
        try:
            mask = _lift_additive(additive, resolve)
        except NotPointwise as e:
            return AttentionRejection(out, str(e), module, "eager")
    softcap = None
    if _is_call(s, "mul") and _is_call(s.args[0], "tanh") and _is_call(s.args[0].args[0], "truediv"):
        c1, c2 = _const(s.args[1]), _const(s.args[0].args[0].args[1])
        if c1 is not None and c1 == c2:
            chain += [s, s.args[0], s.args[0].args[0]]
            softcap, s = c1, s.args[0].args[0].args[0]
    scale = 1.0
    if _is_call(s, "mul") and _const(s.args[1]) is not None:
        chain.append(s)
        scale, s = _const(s.args[1]), s.args[0]
    if not (_is_call(s, "matmul") and len(s.args) == 2 and _is_call(s.args[1], "transpose")):
        return None
    t = s.args[1]
    if sorted(d % 4 for d in t.args[1:3]) != [2, 3]:
        return None
    chain += [s, t]
    q = s.args[0]
    k, k_rep = _unrepeat_kv(t.args[0])
    v, v_rep = _unrepeat_kv(vr)
    if k_rep != v_rep:  # only one side repeated: keep both as they are
        k, v, k_rep, v_rep = t.args[0], vr, False, False
    values = [example_value(x) for x in (q, k, v)]
    if any(not isinstance(x, torch.Tensor) or x.dim() != 4 for x in values):
        return None
    broadcast = _broadcast_reason(mask, q, k)
    if broadcast:
        return AttentionRejection(out, broadcast, module, "eager")
    inner = set(chain[1:])
    if any(u not in inner and u is not out for n in chain[1:] for u in n.users):
        return AttentionRejection(out, "the attention weights are also read elsewhere (output_attentions)", module, "eager")
    pattern = "eager" + ("+sinks" if sinks is not None else "") + (f"+softcap({softcap:g})" if softcap else "") + (
        "+mask(" + ",".join(sorted(mask.uses)) + ")" if mask else "")
    return AttentionSite(out, q, k, v, scale, k_rep or v_rep or values[0].shape[1] != values[1].shape[1],
                         False, mask, module, pattern, softcap, tuple(chain), sinks)


def _softmax_dim(n: fx.Node) -> Any:
    return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)


def _sinks(softmax: fx.Node):
    """GPT-OSS sinks: ``softmax(cat([scores, sinks.reshape(1, H, 1, 1).expand(...)], -1)
    [- max])[..., :-1]``: one extra logit per head joins the normalisation and is dropped.
    Returns (the [H] sinks, the scores, the nodes that go) or a reason."""
    if _softmax_dim(softmax) not in (-1, 3):
        return "attention sinks: the softmax is not over the keys"
    nodes = [softmax]
    x = softmax.args[0]
    if _is_call(x, "sub") and isinstance(x.args[1], fx.Node) and x.args[1].target is operator.getitem \
            and _is_call(x.args[1].args[0], "max") and x.args[1].args[0].args[0] is x.args[0]:
        mx = x.args[1].args[0]
        dim = mx.kwargs.get("dim", mx.args[1] if len(mx.args) > 1 else None)
        keepdim = mx.kwargs.get("keepdim", mx.args[2] if len(mx.args) > 2 else False)
        if x.args[1].args[1] != 0 or dim not in (-1, 3) or keepdim is not True:
            return "attention sinks: the logits are shifted by something other than their row max"
        nodes += [x, x.args[1], mx]  # minus the row max: softmax is shift-invariant
        x = x.args[0]
    cat_dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0) if _is_call(x, "cat") else None
    if cat_dim not in (-1, 3) or len(x.args[0]) != 2:
        return "attention sinks: the extra logit is not concatenated as one key column"
    scores, column = x.args[0]
    nodes.append(x)
    if not (_is_call(column, "expand") and _is_call(column.args[0], "reshape", "view")):
        return "attention sinks: the extra logit is not one value per head, broadcast"
    sinks = column.args[0].args[0]
    shape = tuple(column.args[0].args[1:]) if not isinstance(column.args[0].args[1], (tuple, list)) else tuple(column.args[0].args[1])
    value, heads = example_value(sinks), example_value(scores)
    if shape not in ((1, -1, 1, 1),) or not isinstance(value, torch.Tensor) or value.dim() != 1 \
            or value.shape[0] != heads.shape[1]:
        return "attention sinks: the extra logit is not one value per head, broadcast"
    nodes += [column, column.args[0]]
    return sinks, scores, nodes


def _lift_additive(mask: fx.Node, resolve: Resolve | None) -> MaskProgram:
    """An additive mask ``where(allowed, 0, min)`` (maybe sliced to the key length) as a
    boolean mask program."""
    m = mask
    m = _resolved(m, resolve)  # built outside a checkpointed layer
    while m.target is operator.getitem and isinstance(m.args[1], tuple) and all(isinstance(i, slice) for i in m.args[1]):
        if any(i.start not in (None, 0) or i.step not in (None, 1) for i in m.args[1]):
            raise NotPointwise("the additive mask is read from an offset slice")
        m = m.args[0]  # mask[:, :, :, :kv_len]: a prefix, the same values where they are read
    if not (_is_call(m, "where") and len(m.args) == 3):
        raise NotPointwise("the additive mask is not built as where(allowed, 0, min)")
    cond, zero, low = m.args
    zero_ok = (isinstance(zero, (int, float)) and zero == 0) or (
        isinstance(zero, fx.Node) and _is_call(zero, "zeros") and zero.args in (((),), ())) or (
        isinstance(zero, fx.Node) and _is_call(zero, "tensor") and _const(zero.args[0] if zero.args else None) == 0)
    if not zero_ok or _const(low) is None or _const(low) > _MIN_MASK_VALUE:
        raise NotPointwise("the additive mask is an arbitrary float tensor")
    if example_value(m) is not None and tuple(example_value(m).shape[-1:]) != tuple(example_value(mask).shape[-1:]):
        raise NotPointwise("the additive mask is sliced to fewer keys than it was built for")
    return lift_mask(cond, resolve)
