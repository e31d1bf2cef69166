"""Small helpers for reading the graphs Dynamo hands a backend."""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (``None`` for non-nodes)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def tensor_value(node: Any) -> torch.Tensor | None:
    v = example_value(node)
    return v if isinstance(v, torch.Tensor) else None


def known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, True only when provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def leading_numel(t: torch.Tensor) -> Any:
    return math.prod(t.shape[:-1]) if t.dim() >= 1 else 1


def hint(value: Any) -> int:
    """A concrete int for an int or SymInt (its hint), for reports and defaults."""
    if isinstance(value, int):
        return value
    try:
        return int(value.node.hint)
    except Exception:
        return int(value)


def op_name(node: fx.Node) -> str:
    """``silu``, ``linear``, ``cumsum``, ``view``... as a person would name the op."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None) or str(node.target)
        return name.split(".")[-1]
    return node.op


def arg_nodes(node: fx.Node) -> Iterator[fx.Node]:
    """Every node among a node's args and kwargs, in order, without duplicates."""
    seen: set[fx.Node] = set()
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    for n in out:
        if n not in seen:
            seen.add(n)
            yield n


_ROOT = re.compile(r"^[LG]\[[^\]]*\](?:\[[^\]]*\])*\.?")
_GETATTR = re.compile(r"getattr\(([^,]+), '([^']+)'\)")
_MODULES_DICT = re.compile(r"(?:^|(?<=\.))(?:__dict__\[['\"]_modules['\"]\]|_modules)\[['\"]([^'\"]+)['\"]\]")


def normalize_module_path(path: str) -> str:
    """``L['args'][0].model.layers[0].mlp`` -> ``model.layers.0.mlp``."""
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    path = re.sub(r"^G\[['\"]([^'\"]+)['\"]\]", r"\1", path)  # a global module keeps its name
    path = _ROOT.sub("", path)
    # A module reached through ``__dict__['_modules']['name']`` (PEFT's wrappers, whose
    # ``__getattr__`` Dynamo traces through) is the child ``name``, as named_modules() says.
    path = _MODULES_DICT.sub(r"\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        out.append(normalize_module_path(str(path)))
    return out


def common_module(nodes: Iterable[fx.Node]) -> str:
    """The innermost module whose forward contains every node (dotted path, may be '')."""
    common: list[str] | None = None
    for n in nodes:
        stack = module_stack(n)
        if common is None:
            common = stack
            continue
        i = 0
        while i < min(len(common), len(stack)) and common[i] == stack[i]:
            i += 1
        common = common[:i]
    return common[-1] if common else ""


def autocast_state(graph: fx.Graph) -> dict[fx.Node, tuple[str, torch.dtype] | None]:
    """For each node, the (device_type, dtype) of the enclosing enabled autocast block."""
    state: dict[fx.Node, tuple[str, torch.dtype] | None] = {}
    stack: list[tuple[str, torch.dtype] | None] = []
    enter = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
    exit_ = getattr(torch.amp.autocast_mode, "_exit_autocast", None)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is enter:
            device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            stack.append((device_type, dtype) if enabled else None)
        elif node.op == "call_function" and node.target is exit_:
            if stack:
                stack.pop()
        state[node] = stack[-1] if stack else None
    return state


_INPLACE_OPERATORS = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}


def mutates(node: fx.Node) -> bool:
    """Does ``node`` write into one of its inputs? (``x.add_(1)``, ``x[i] = v``, ``out=``,
    an op whose schema mutates.) FX's own dead-code pass treats most of these as pure."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("out") is not None:
        return True
    if getattr(node.target, "__module__", None) == "_operator":
        return False  # operator.and_ / or_ / not_ are not in place
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(getattr(schema, "is_mutable", False))
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def remove_dead_nodes(graph: fx.Graph) -> int:
    """Erase nodes nothing reads, keeping any that mutate an input (a KV-cache write, an
    in-place op) or have side effects: FX's own ``eliminate_dead_code`` deletes unused
    in-place method calls."""
    removed = 0
    for n in reversed(list(graph.nodes)):
        if n.op in ("placeholder", "output") or n.users or mutates(n) or n.is_impure():
            continue
        graph.erase_node(n)
        removed += 1
    return removed
