"""The MoE description for the engine: MoE blocks (router + experts, optional shared
expert) in a Dynamo graph.

Where a block starts: a routing op (``topk``) whose scores come, through row-wise ops,
from a projection of some tensor ``x`` (the router's source). The engine's one walk, as
for a dense MLP, sweeps forward from ``x`` (:func:`tilepass.engine.sweep`): everything
computed from ``x`` and weights alone, judged op by op, rows followed through dispatch
(repeat/sort/gather), the experts (grouped matmul or batched matmul over gathered weights)
and the combine (un-sort, sum over top-k). The first op the judge cannot follow ends the
region there; :func:`tilepass.engine.cut` keeps what the block's last expert output needs,
and the ops after it run untiled, as before. What this kind adds: that output; the block
is tiled when it holds an expert computation and every value leaving it is back in
natural token order, e.g. ``(hidden [B, S, H], router_logits [B*S, E])``; and its
pattern name (``moe_{grouped_mm|batched_mm}_top{k}[_shared]``).

Knows nothing of tiling; returns matches and rejections with reasons.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from . import rowwise
from .engine import Judge, Rejection, cut, data_dependent, sweep
from .fx_utils import arg_nodes, common_module, example_value, leading_numel, op_name, tensor_value
from .layouts import Tok


@dataclasses.dataclass
class MoeMatch:
    source: fx.Node
    nodes: list[fx.Node]  # region, graph order (without the source)
    outputs: list[fx.Node]
    params: list[fx.Node]
    layouts: dict[fx.Node, Any]
    pattern: str
    module: str
    num_tokens: int
    in_features: int
    expanded_width: int  # widest per-token row group inside (top_k x expert width)
    uses_rng: bool = False  # dropout in training inside (a LoRA adapter's): its RNG is replayed in the recompute


_ROUTING_OPS = {torch.topk}
_CASTS = {"float", "double", "half", "bfloat16", "to", "type", "contiguous"}
# A router's scores reach its topk through a few row-wise ops (softmax or sigmoid, a
# score-correction bias, a group view, a mask of the kept groups); past this many the
# topk is not a router's.
_MAX_ROUTER_DEPTH = 24


def _is_routing(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ROUTING_OPS) or (node.op == "call_method" and node.target == "topk")


def _router_source(topk: fx.Node) -> fx.Node | None:
    """x in ``topk(f(linear(x, W_router)))``, before token reshapes and casts. ``f`` is
    followed through first arguments (the scores: ``softmax``, ``sigmoid``, ``+ bias``,
    a group ``view``, ``masked_fill``...); whether it is row-wise is the region
    analysis's to prove, not this search's."""
    n = topk.args[0]
    for _ in range(_MAX_ROUTER_DEPTH):
        if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
            return None
        ops = rowwise.matmul_operands(n)
        xv = tensor_value(ops[0]) if ops else None
        if xv is not None and xv.dim() >= 2:
            break
        n = n.args[0] if n.args else None
    else:
        return None
    num_tokens = leading_numel(xv)
    x = rowwise.projection_input(n, num_tokens)
    if x is None:
        return None
    # A cast that only the router reads (``x.view(-1, H).type(torch.float32)``) is the
    # router's; the experts read x itself.
    router_only = len(x.users) == 1
    while x.op in ("call_function", "call_method") and (
        rowwise.classify(x, num_tokens).kind == "view" or (_is_cast(x) and router_only)
    ):
        x = x.args[0]
        router_only = router_only and len(x.users) == 1
    return x


def _is_cast(node: fx.Node) -> bool:
    """``x.float()``, ``x.to(torch.float32)``, ``x.type(torch.float32)``: same rows, another dtype."""
    if node.op != "call_method" or node.target not in _CASTS or node.kwargs.get("device") is not None:
        return False
    return all(isinstance(a, torch.dtype) for a in node.args[1:])


def find_moes(graph: fx.Graph) -> tuple[list[MoeMatch], list[Rejection]]:
    matches: list[MoeMatch] = []
    rejections: list[Rejection] = []
    claimed: set[fx.Node] = set()
    sources_done: set[fx.Node] = set()
    data = None
    for seed in graph.nodes:
        if not _is_routing(seed) or seed in claimed:
            continue
        source = _router_source(seed)
        sv = tensor_value(source) if source is not None else None
        if sv is None:
            continue
        num_tokens = sv.shape[: sv.dim() - 1].numel() if all(isinstance(s, int) for s in sv.shape) else None
        module = common_module([seed])
        if num_tokens is None:
            rejections.append(Rejection(seed, "symbolic token count: MoE blocks are tiled with static shapes only", module, "moe", [seed]))
            continue
        if data is None:
            data = data_dependent(graph)
        if source in sources_done:
            continue  # another topk on the same router (e.g. the aux loss): one block per input
        result = _analyse(graph, seed, source, num_tokens, data)
        if result is None:
            continue
        sources_done.add(source)
        if isinstance(result, Rejection):
            rejections.append(result)
            continue
        if claimed & set(result.nodes):
            rejections.append(Rejection(seed, "overlaps another MoE region", result.module, result.pattern, result.nodes))
            continue
        claimed |= set(result.nodes)
        matches.append(result)
    return matches, rejections


def _analyse(graph: fx.Graph, seed: fx.Node, source: fx.Node, num_tokens: int, data: set[fx.Node]):
    analysis = Judge(num_tokens)
    swept = sweep(graph, {source}, analysis, data)
    region, in_region = swept.nodes, swept.inside
    expert_derived: set[fx.Node] = set()
    for n in region:
        if n in analysis.experts or any(a in expert_derived for a in arg_nodes(n)):
            expert_derived.add(n)

    module = common_module(region or [seed]) or common_module([seed])
    # top-k: rows per token after dispatch (the seed may be a group-limited router's first topk)
    k = max((lay.m for lay in analysis.layouts.values() if isinstance(lay, Tok)), default=1)
    if k == 1:  # no dispatch seen: the seed's own k
        k = seed.args[1] if len(seed.args) > 1 else seed.kwargs.get("k", 1)
    dispatch = "grouped_mm" if any(op_name(n) in ("grouped_mm_fallback", "grouped_mm", "_grouped_mm") for n in region) else "batched_mm"
    shared = any(rowwise.projection_input(n, num_tokens) is not None and n is not seed.args[0] for n in region
                 if rowwise.is_matmul(n) and example_value(rowwise.matmul_operands(n)[1]) is not None
                 and example_value(rowwise.matmul_operands(n)[1]).dim() == 2
                 and _feeds(n, seed) is False)
    pattern = f"moe_{dispatch}_top{k}" + ("_shared" if shared else "")
    first_stop = next(iter(swept.stopped.values()), None)
    if seed not in in_region:
        return Rejection(seed, first_stop or "the router is not row-wise", module, pattern, region)
    if not analysis.experts:
        reason = ("the routed experts are not in this graph: a graph break separates them from the router "
                  "(experts_implementation='eager' breaks it around each expert, use 'grouped_mm' or 'batched_mm'; "
                  "so does PEFT's LoRA on the expert weights (target_parameters), whose parametrization Dynamo "
                  "cannot trace; so can per-layer compile or FSDP2 where the router logits are captured for an "
                  "aux loss; TORCH_LOGS=graph_breaks shows where)"
                  if first_stop is None else
                  f"the routed experts are not in this graph; the routing is followed up to: {first_stop}")
        return Rejection(seed, reason, module, pattern, region)
    # The block's output: the last value computed from the experts that is back in token
    # order and read outside. The region is what it needs; the rest (e.g. an aux loss
    # reading the router logits) runs untiled after it, as before.
    primary = [n for n in region if n in expert_derived and _natural(analysis.layouts[n])
               and any(u not in in_region for u in n.users)]
    if not primary:
        reason = first_stop or "no expert output leaves the block in token order"
        return Rejection(seed, reason, module, pattern, region)
    block = cut(swept, primary[-1])
    region, outputs = block.nodes, block.outputs
    if seed not in block.inside:
        return None  # a topk after the block (an aux loss reading the router logits)
    module = common_module(region)
    for o in outputs:
        if not _natural(analysis.layouts[o]):
            reason = first_stop or f"`{o.name}` leaves the block with its rows in expert order"
            return Rejection(seed, reason, module, pattern, region)
        if not isinstance(example_value(o), torch.Tensor):
            return Rejection(seed, f"`{o.name}` leaves the block and is not a tensor", module, pattern, region)
    # Activation width per token (top_k x expert width), for the default tile count; the
    # [rows, out, in] expert weights that batched_mm gathers are not activations.
    sv = tensor_value(source)
    widths = [lay.m * _features(example_value(n), lay.row_dims) for n, lay in analysis.layouts.items()
              if isinstance(lay, Tok) and isinstance(example_value(n), torch.Tensor)
              and example_value(n).dim() == lay.row_dims + 1]
    return MoeMatch(
        source=source, nodes=region, outputs=outputs, params=block.params, layouts=dict(analysis.layouts),
        pattern=pattern, module=module, num_tokens=num_tokens, in_features=int(sv.shape[-1]),
        expanded_width=max(widths) if widths else int(sv.shape[-1]),
        uses_rng=any(rowwise.draws_random(n) for n in region),
    )


def _natural(layout: Any) -> bool:
    return isinstance(layout, Tok) and layout.m == 1 and layout.perm is None


def _features(v: torch.Tensor, row_dims: int) -> int:
    return int(v.shape[row_dims:].numel())


def _feeds(node: fx.Node, target: fx.Node) -> bool:
    """Does ``node`` reach ``target`` (is it part of the router)?"""
    stack, seen = [target], set()
    while stack:
        n = stack.pop()
        if n is node:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(arg_nodes(n))
    return False

