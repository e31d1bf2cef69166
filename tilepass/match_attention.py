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
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import arg_nodes, common_module, example_value, op_name

_POINTWISE_FUNCTIONS = {
    operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.invert, operator.sub, operator.add, operator.mul, operator.floordiv, operator.mod, operator.neg,
    torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.where, torch.abs, torch.remainder, torch.sub, torch.add,
}
_POINTWISE_METHODS = {"le", "lt", "ge", "gt", "eq", "ne", "logical_and", "logical_or", "logical_not", "__and__",
                      "__or__", "__invert__", "sub", "add", "abs", "to", "bool", "int", "long"}
_IDENTITY_METHODS = {"expand", "expand_as", "contiguous"}
_DIMS = ("b", "h", "q_idx", "kv_idx")


@dataclasses.dataclass
class MaskProgram:
    program: fx.GraphModule  # fn(b, h, q_idx, kv_idx, *data) -> bool tensor
    data: list[fx.Node]  # graph values the mask reads (e.g. the 2-D attention_mask)
    uses: frozenset[str]  # which of b, h, q_idx, kv_idx it depends on


@dataclasses.dataclass
class AttentionSite:
    node: fx.Node  # the scaled_dot_product_attention call
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    enable_gqa: bool
    causal: bool
    mask: MaskProgram | None
    module: str
    pattern: str


@dataclasses.dataclass
class AttentionRejection:
    node: fx.Node
    reason: str
    module: str


class NotPointwise(Exception):
    pass


def _index_leaf(node: fx.Node) -> tuple[int, Any] | None:
    """``arange(n)[None, None, :, None]`` (optionally ``+ offset`` before indexing): (dim, offset)."""
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    src, idx = node.args
    if not isinstance(idx, tuple) or len(idx) != 4:
        return None
    full = [i for i, s in enumerate(idx) if s == slice(None)]
    if len(full) != 1 or any(s is not None for i, s in enumerate(idx) if i != full[0]):
        return None
    offset = 0
    if op_name(src) == "add" and isinstance(src.args[1], int) and isinstance(src.args[0], fx.Node):
        src, offset = src.args[0], src.args[1]
    if op_name(src) != "arange" or len(src.args) != 1:
        return None
    return full[0], offset


def lift_mask(mask: fx.Node) -> MaskProgram:
    """Copy the construction of a boolean ``[B, H, Q, KV]`` mask into a pointwise mask program."""
    value = example_value(mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise NotPointwise(f"the mask is a {getattr(value, 'dtype', type(value).__name__)} tensor (an additive mask), not a boolean one")
    if value.dim() != 4:
        raise NotPointwise(f"the mask has {value.dim()} dims, not [B, H, Q, KV]")
    order: list[fx.Node] = []
    leaves: dict[fx.Node, tuple[int, Any]] = {}
    data: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
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
        if n.op == "call_method" and n.target == "to" and any(isinstance(a, torch.dtype) and a.is_floating_point for a in n.args):
            raise NotPointwise("the mask goes through a float tensor")
        for a in arg_nodes(n):
            visit(a)
        order.append(n)

    visit(mask)
    if not leaves:
        raise NotPointwise("the mask does not depend on positions (a mask passed in from outside)")
    graph = fx.Graph()
    idx = [graph.placeholder(d) for d in _DIMS]
    env: dict[fx.Node, Any] = {}
    for leaf, (dim, offset) in leaves.items():
        env[leaf] = idx[dim] if not offset else graph.call_function(operator.add, (idx[dim], offset))
    for i, d in enumerate(data):
        env[d] = graph.placeholder(f"data{i}")
    graph_order = {n: i for i, n in enumerate(mask.graph.nodes)}
    for n in sorted(order, key=graph_order.__getitem__):
        if n.op == "call_method" and n.target in _IDENTITY_METHODS:
            env[n] = env[n.args[0]]
            continue
        env[n] = graph.create_node(n.op, n.target, fx.node.map_arg(n.args, lambda m: env[m]),
                                   fx.node.map_arg(n.kwargs, lambda m: env[m]), name=n.name)
    graph.output(env[mask])
    uses = frozenset(_DIMS[dim] for dim, _ in leaves.values())
    return MaskProgram(fx.GraphModule(torch.nn.Module(), graph, class_name="MaskProgram"), data, uses)


def find_attention(graph: fx.Graph) -> tuple[list[AttentionSite], list[AttentionRejection]]:
    sites, rejections = [], []
    for n in graph.nodes:
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
                    mask = lift_mask(kw["attn_mask"])
                except NotPointwise as e:
                    reason = str(e)
        if reason is not None:
            rejections.append(AttentionRejection(n, reason, module))
            continue
        pattern = "causal" if causal else ("full" if mask is None else "mask(" + ",".join(sorted(mask.uses)) + ")")
        sites.append(AttentionSite(n, q, k, v, kw.get("scale"), bool(kw.get("enable_gqa", False)), causal, mask, module, pattern))
    return sites, rejections
