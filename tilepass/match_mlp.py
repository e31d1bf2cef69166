"""The dense MLP description for the engine: dense MLPs in a Dynamo graph, from the graph alone.

An MLP here is a *down* projection whose token input is computed, through row-wise ops
only, from one or more *up* projections that all read the same tensor ``x``::

    x ─┬─ up_1 ─┐
       ├─ up_2 ─┼─ (activation, gating, chunking, casts...) ─ down ─> y
       └─ ...  ─┘

This covers SwiGLU/GeGLU (gate, up), fused gate_up + chunk (Phi-3), and plain two-layer
MLPs (GELU exact/tanh/spelled out, ReLU, SiLU), with or without biases, whether the
projections are ``linear`` or ``view/addmm/view`` (GPT-2's Conv1D). Instead of a list of
model shapes there is the engine's one rule: every op between the projections must act
row-wise on tokens (:mod:`tilepass.rowwise`, the judge's plain case), and the region is
what the engine's walk gives: swept forward from ``x`` (:func:`tilepass.engine.sweep`,
LoRA branches included), cut back to the down projection with one value leaving
(:func:`tilepass.engine.one_output`, a LoRA branch on the down projection up to its add).
What this kind adds: where a candidate starts (a down projection, walked back to its up
projections), its ``x`` (the earliest tensor the ups read, before token views), its
pattern name, the reasons (an up projection the sweep from ``x`` did not reach: they
read different inputs) and that its one output has the input's token dims. A candidate
that breaks the rule is returned as a :class:`~tilepass.engine.Rejection` with the reason.

This module knows nothing of tiling; it only says what is there.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from . import rowwise
from .engine import (Judge, Rejection, Swept, data_args, one_output, read_outside, same_value, strip_token_views,
                     sweep)
from .fx_utils import arg_nodes, common_module, example_value, leading_numel, op_name, tensor_value

# A walk from a projection back through more nodes than this is not an MLP (it is the
# residual stream reaching back through the model).
_MAX_REGION_NODES = 64


@dataclasses.dataclass
class MlpMatch:
    source: fx.Node  # the one token tensor the region reads (before token reshapes)
    token_inputs: set[fx.Node]  # the nodes through which it reads it (source, or views of it)
    nodes: list[fx.Node]  # the region, graph order
    ups: list[fx.Node]  # the projections the walk back from the down stopped at
    down: fx.Node
    output: fx.Node  # the value that leaves the region (down, the view after it, the add of a LoRA branch)
    params: list[fx.Node]  # external inputs (weights, biases...), in first-use order
    pattern: str
    module: str
    num_tokens: Any
    in_features: int
    intermediate: int  # total width of the up projections that read x
    uses_rng: bool = False  # dropout in training inside: its RNG is replayed in the recompute

    @property
    def inner(self) -> list[fx.Node]:
        return [n for n in self.nodes if n not in self.ups and n is not self.output]


def _walk_back(down: fx.Node, num_tokens: Any) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Nodes between the ups and ``down`` (inner) and the ups; None if not MLP-shaped."""
    start = rowwise.projection_input(down, num_tokens)
    stack, inner, ups, seen = [start], [], [], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if rowwise.projection_input(n, num_tokens) is not None:
            ups.append(n)
            continue
        if n.op not in ("call_function", "call_method") or len(inner) >= _MAX_REGION_NODES:
            return None  # the token data comes from somewhere other than a projection
        if rowwise.mixes_activations(n):
            return None  # a product of two activations: attention, not an MLP
        inner.append(n)
        for a in arg_nodes(n):
            # Follow token data, and anything else that varies over tokens (a mean over
            # the sequence is [B, 1, F]): only weights and feature-wise tensors stay outside.
            v = example_value(a)
            if isinstance(v, (tuple, list)):
                if v and all(rowwise.is_token_tensor(t, num_tokens) for t in v):
                    stack.append(a)
            elif isinstance(v, torch.Tensor) and (
                rowwise.is_token_tensor(v, num_tokens) or not rowwise.broadcasts_over_features(v)
            ):
                stack.append(a)
    return inner, ups


def _pattern(ups: list[fx.Node], inner: list[fx.Node], num_tokens: Any) -> str | None:
    acts = [a for a in (rowwise.activation_name(n) for n in inner) if a]
    if not acts:
        return None
    names = {op_name(n) for n in inner}
    act = acts[0]
    if act == "tanh" and "pow" in names:
        act = "gelu_tanh"  # GPT-2's NewGELU, spelled out
    gated = _is_gated(ups, inner, num_tokens)
    if not gated:
        return f"mlp_{act}"
    glu = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}.get(act, f"{act}_glu")
    return f"fused_gate_up_{glu}" if len(ups) == 1 else glu


def _is_gated(ups: list[fx.Node], inner: list[fx.Node], num_tokens: Any) -> bool:
    """A product of two branches of the input (gate x up), not e.g. ``0.5 * x * (1 + tanh(...))``.

    A branch is an up projection, or one piece of a fused projection (a getitem of its
    chunk/split, or a slice of its features).
    """
    roots: dict[fx.Node, frozenset[fx.Node]] = {u: frozenset([u]) for u in ups}
    for n in inner:  # graph order, so args come first
        kind = rowwise.classify(n, num_tokens).kind
        if kind == "getitem":
            roots[n] = frozenset([n])
            continue
        token_args = [a for a in arg_nodes(n) if a in roots]
        roots[n] = frozenset().union(*(roots[a] for a in token_args)) if token_args else frozenset()
        if op_name(n) in ("mul", "__mul__") and len(token_args) == 2 and roots[token_args[0]] != roots[token_args[1]]:
            return True
    return False


def _output_node(down: fx.Node, source: fx.Node, num_tokens: Any) -> fx.Node:
    """``down``, or the single view after it that gives back the source's token dims."""
    users = list(down.users)
    if len(users) == 1 and rowwise.classify(users[0], num_tokens).kind == "view":
        out, src = tensor_value(users[0]), tensor_value(source)
        if out is not None and src is not None and tuple(out.shape[:-1]) == tuple(src.shape[:-1]):
            return users[0]
    return down


def find_mlps(graph: fx.Graph) -> tuple[list[MlpMatch], list[Rejection]]:
    """Every MLP-shaped region: those that can be tiled, and near misses with a reason.
    One record per MLP: a down projection reached again through an adapter on it (LoRA's
    ``lora_A`` reads the same intermediate) is the same MLP."""
    matches: list[MlpMatch] = []
    rejections: list[Rejection] = []
    claimed: set[fx.Node] = set()
    seen_ups: set[fx.Node] = set()
    order = _order(graph)
    for down in graph.nodes:
        operands = rowwise.matmul_operands(down)
        xv = tensor_value(operands[0]) if operands else None
        if xv is None or xv.dim() < 2:
            continue
        num_tokens = leading_numel(xv)
        if rowwise.projection_input(down, num_tokens) is None:
            continue
        walked = _walk_back(down, num_tokens)
        if walked is None:
            continue
        inner, ups = walked
        inner_set = set(inner)
        inner = [n for n in graph.nodes if n in inner_set]
        pattern = _pattern(ups, inner, num_tokens)
        if not ups:
            continue
        if pattern is None:
            # Projections without an activation between them are not an MLP. One exception is
            # recorded as a near miss: a custom autograd.Function between them (BLOOM's GELU in
            # training), which is where a model's own activation hides from the rule.
            custom = [n for n in inner if op_name(n) == "autograd_function_apply"]
            unknown = [n for n in inner if not rowwise.classify(n, num_tokens).ok]
            if custom and unknown == custom and down not in claimed:
                nodes = sorted({*ups, *inner, down}, key=order)
                rejections.append(Rejection(down, rowwise.classify(custom[0], num_tokens).reason,
                                            common_module(nodes), "mlp", nodes))
            continue
        if down in claimed or seen_ups & set(ups):
            continue  # the same MLP, reached again from an adapter's projection
        seen_ups |= set(ups)
        ups = sorted(ups, key=order)
        inputs = _token_inputs(ups, num_tokens, order)
        source = min(inputs, key=order)
        output = _output_node(down, source, num_tokens)
        seed = sorted({*ups, *inner, down, output}, key=order)
        reason = next((v.reason for v in (rowwise.classify(n, num_tokens) for n in inner) if not v.ok), None)
        region = _grow(graph, seed, output, inputs, num_tokens) if reason is None else None
        if isinstance(region, str):
            reason, region = region, None
        nodes = region.nodes if region else seed
        module = common_module(nodes)
        if region is not None:
            reason = _check_output(region.outputs[0], source)
        if reason is None and claimed & set(nodes):
            reason = "overlaps another MLP region"
        if reason is not None:
            rejections.append(Rejection(down, reason, module, pattern, nodes))
            continue
        reading_x = [u for u in ups if _reads(u, inputs, source, num_tokens)] or ups
        matches.append(MlpMatch(
            source=source, token_inputs=inputs, nodes=nodes, ups=ups, down=down,
            output=region.outputs[0], params=region.params, pattern=pattern, module=module, num_tokens=num_tokens,
            in_features=int(tensor_value(source).shape[-1]),
            intermediate=sum(int(tensor_value(u).shape[-1]) for u in reading_x),
            uses_rng=any(rowwise.draws_random(n) for n in nodes),
        ))
        claimed |= set(nodes)
    return matches, rejections


def _token_inputs(ups: list[fx.Node], num_tokens: Any, order) -> set[fx.Node]:
    """The region's input ``x`` (the earliest tensor an up projection reads, before token
    views), a copy of it computed twice (a norm Dynamo keeps twice), and the token views
    of those the projections read: all of them are the tile program's ``x``."""
    reads = [rowwise.projection_input(u, num_tokens) for u in ups]
    source = min((strip_token_views(x, num_tokens) for x in reads), key=order)
    inputs = {source}
    for x in reads:
        root = strip_token_views(x, num_tokens)
        if same_value(root, source):
            while x is not root:
                inputs.add(x)
                x = x.args[0]
            inputs.add(root)
    return inputs


def _grow(graph: fx.Graph, seed: list[fx.Node], output: fx.Node, inputs: set[fx.Node], num_tokens: Any):
    """The engine's walk from ``inputs``: the region (a :class:`~tilepass.engine.Cut`), or why not."""
    swept = sweep(graph, inputs, Judge(num_tokens, natural=True))
    missing = next((n for n in seed if n not in swept.inside), None)
    if missing is not None:
        if any(a not in swept.inside for a in data_args(missing, num_tokens)):
            names = {min(inputs, key=swept.order.__getitem__)} | _others(swept, seed, num_tokens)
            return f"the up projections read different inputs ({', '.join(sorted(f'`{s.name}`' for s in names))})"
        if missing in swept.stopped:
            return swept.stopped[missing]
        back = next((a for a in arg_nodes(missing) if a in swept.tainted and a not in swept.inside), None)
        kept = set(seed)
        leaks = [n for n in seed if n is not output and any(u not in kept for u in n.users)]
        if back is not None and leaks:  # the value is computed from one that leaves the seed
            return read_outside(leaks, kept, swept.order, "the MLP")
        if back is not None:
            return f"`{back.name}` is computed from the MLP and read back into it"
        return f"`{missing.name}` ({op_name(missing)}) is not computed from the MLP's input"
    return one_output(swept, output, "the MLP", lambda n: (
        [n.args[0]] if rowwise.classify(n, num_tokens).kind == "view" else arg_nodes(n)))


def _others(swept: Swept, seed: list[fx.Node], num_tokens: Any) -> set[fx.Node]:
    """The token tensors from outside that the seed reads, directly or through values it
    computes from them and ``x`` (``up(x + r)`` reads ``r``)."""
    out: set[fx.Node] = set()
    stack = [a for n in seed for a in data_args(n, num_tokens) if a not in swept.inside and a not in seed]
    seen: set[fx.Node] = set()
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        more = [b for b in data_args(a, num_tokens) if b not in swept.inside] if a in swept.made else []
        stack.extend(more)
        if not more:
            out.add(strip_token_views(a, num_tokens))
    return out


def _reads(up: fx.Node, inputs: set[fx.Node], source: fx.Node, num_tokens: Any) -> bool:
    """Does the projection read the region's input itself (not an adapter's bottleneck)?"""
    x = rowwise.projection_input(up, num_tokens)
    return x in inputs or same_value(strip_token_views(x, num_tokens), source)


def _check_output(output: fx.Node, source: fx.Node) -> str | None:
    out, src = tensor_value(output), tensor_value(source)
    if out is None or src is None or (out.dim() != 2 and tuple(out.shape[:-1]) != tuple(src.shape[:-1])):
        return "the output's token dims differ from the input's"
    return None


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]
