"""Constants in transformers' masking code, evaluated at compile time.

Position ids and document ids are often computed from constants alone (an ``arange``, a
``cumsum`` of restarts that never happen). :func:`constant_data` proves such a tensor is
uniform or a plain position ramp, without evaluating it where its length is symbolic, so
that a mask reading it folds to a smaller program (often plain causal).
:func:`eval_constant` folds one op on Python constants with torch's meaning. Used by
:mod:`tilepass.mask_program`; knows nothing of attention sites.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .fx_utils import arg_nodes, example_value, mutates, op_name


def is_device_move(n: fx.Node) -> bool:
    """``x.to(device)`` or ``x.to(device=...)``: a move, neither a dtype change nor a copy that matters."""
    if n.target != "to":
        return False
    kwargs = dict(n.kwargs)
    devices = [*n.args[1:], *([kwargs.pop("device")] if "device" in kwargs else [])]
    return bool(devices) and all(isinstance(a, (torch.device, str)) for a in devices) and set(kwargs) <= {"non_blocking"}


# Binary ops folded on Python constants, by the name Dynamo records them under: operator
# functions, Tensor methods and Tensor dunders (``__eq__`` on torch 2.11 CUDA) alike.
_COMPARE = {"eq": operator.eq, "ne": operator.ne, "le": operator.le, "lt": operator.lt, "ge": operator.ge,
            "gt": operator.gt, "and": operator.and_, "or": operator.or_, "xor": operator.xor}


_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
               "mod": operator.mod}


def eval_constant(n: fx.Node, args: tuple) -> bool | int | None:
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


# Ops that compute position and document ids in transformers' masking code; anything else
# is not evaluated at compile time.
_CONSTANT_OPS = {"arange", "add", "sub", "mul", "floordiv", "neg", "unsqueeze", "getitem", "diff", "ne", "eq",
                 "lt", "le", "gt", "ge", "cumsum", "expand", "to", "view", "reshape", "ones", "zeros", "full",
                 "new_ones", "new_zeros", "ones_like", "zeros_like", "full_like", "clone", "contiguous", "int",
                 "long", "bool", "__and__", "__or__", "__eq__", "__ne__", "__add__", "__sub__", "__mul__"}


def constant_data(node: fx.Node) -> tuple[str, Any] | None:
    """``("uniform", c)`` if ``node`` is computed from constants alone (no graph input, no
    randomness, static shapes) and every element is ``c``; ``("position", offset)`` if it is
    ``[B, S]`` with ``value[b, i] == i + offset`` in every row; else None."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    if not all(isinstance(s, int) for s in value.shape):
        return symbolic_constant_data(node)
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


def symbolic_constant_data(node: fx.Node) -> tuple[str, Any] | None:
    """:func:`constant_data` for a symbolic length, where nothing can be evaluated: the same
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
    """One op of :func:`symbolic_constant_data` on abstract values (None: not provable)."""
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
    if name in ("clone", "contiguous") or is_device_move(n):
        return x
    if kind == "uniform" and not any(isinstance(a, fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
        folded = eval_constant(n, (c, *n.args[1:]))  # one element's value: the same rules as in lift_mask
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


def constant_tensor(graph: fx.Graph, index: fx.Node, value: bool | int | float) -> fx.Node:
    """``value`` as a tensor broadcastable like ``index``, by index arithmetic alone (what a
    mask_mod can hold)."""
    if isinstance(value, bool):
        return graph.call_function(operator.eq if value else operator.ne, (index, index))
    return graph.call_function(operator.add, (graph.call_function(operator.mul, (index, 0)), value))
