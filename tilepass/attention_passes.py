"""The attention passes: route provably equivalent attention to SDPA's fused kernels (in
groups of heads while training) or to flex attention, and keep attention's outputs in
checkpointed layers (``save_attention``). Same signature as every pass, ``fn(gm, ctx) -> int``."""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from . import attention_runtime, checkpoint_policy, flex_versions
from .fx_utils import common_module, hint, op_name, tensor_value
from .hop_inputs import BodyInputs
from .mask_program import is_plain_causal, same_size
from .match_attention import AttentionSite, find_attention
from .options import default_head_groups
from .pass_context import PassContext, cleanup, nbytes
from .region import program_key
from .report import Record


REPLACES = "tilepass_replaces"  # node meta: the name of the node a routed call replaced


def route_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Replace provably equivalent attention (SDPA with a dense mask, or the eager softmax
    form) with SDPA's fused causal kernels or flex attention over a BlockMask."""
    inputs = BodyInputs(ctx.root) if ctx.root is not None and ctx.root is not gm else None
    sites, rejections = find_attention(gm.graph, inputs.source if inputs else None)
    inputs_before = [n for n in gm.graph.nodes if n.op == "placeholder" and n.users]
    for r in rejections:
        ctx.records.append(Record("rejected", "attention", r.module, r.pattern, ctx.graph_index,
                                  reason=r.reason, nodes=[r.node.name]))  # one node: no region
    routed = 0
    in_checkpoint = inputs is not None and bool(inputs.calls.get(gm.graph))
    for s in sites:
        qv = tensor_value(s.q)
        # from the traced values, not the grad mode at compile time: a region may turn grad
        # on inside (enable_grad under an outer no_grad), and its values say so
        training = any(tensor_value(t).requires_grad for t in (s.q, s.k, s.v))
        kernel = attention_kernel(s, ctx.options.attention_kernel)
        groups, reason = head_groups(s, kernel, ctx.options.attention_head_groups, training)
        if kernel is None and groups > 1:
            kernel = "sdpa"  # a plain SDPA call, split over groups of heads
        reason = reason or _not_routable_here(s, kernel, qv.device.type, training, in_checkpoint)
        if reason:
            ctx.records.append(Record("rejected", "attention", s.module, s.pattern, ctx.graph_index,
                                      nodes=[s.node.name], reason=reason))
            continue
        key = None
        with gm.graph.inserting_before(s.node):
            if kernel == "sdpa" and groups > 1:
                new = gm.graph.call_function(attention_runtime.sdpa_head_groups, (s.q, s.k, s.v), dict(
                    groups=groups, is_causal=s.mask is not None or s.causal, scale=s.scale, enable_gqa=s.enable_gqa))
            elif kernel == "sdpa":
                new = gm.graph.call_function(F.scaled_dot_product_attention, (s.q, s.k, s.v), dict(
                    is_causal=s.mask is not None or s.causal, scale=s.scale,
                    **({"enable_gqa": True} if s.enable_gqa else {})))
            else:
                if s.mask is not None:
                    key = program_key("mask", s.mask.program, None)
                    attention_runtime.register_mask(key, s.mask.program)
                    ctx.programs[key] = s.mask.program.code
                # mask data built outside a checkpointed layer is passed into it
                data = [d if d.graph is gm.graph else inputs.thread(gm.graph, d) for d in (s.mask.data if s.mask else [])]
                new = gm.graph.call_function(attention_runtime.flex_sdpa, (s.q, s.k, s.v, data), dict(
                    mask_key=key, causal=s.causal, scale=s.scale, enable_gqa=s.enable_gqa,
                    per_batch=bool(s.mask and "b" in s.mask.uses), per_head=bool(s.mask and "h" in s.mask.uses),
                    softcap=s.softcap, sinks=s.sinks))
                ctx.inductor_patches.update(flex_versions.inductor_patches(training, qv.device.type))
        new.meta.update({k: v for k, v in s.node.meta.items() if k in ("example_value", "nn_module_stack", "stack_trace")})
        new.meta[REPLACES] = s.node.name  # the node it stands for in Dynamo's graph (dumps, records)
        s.node.replace_all_uses_with(new)
        gm.graph.erase_node(s.node)  # an eager form's scores and weights go with the dead-code pass
        ctx.records.append(Record("rewritten", "attention", s.module, s.pattern, ctx.graph_index,
                                  nodes=[s.node.name], region_key=key, tokens=int(hint(qv.shape[2])), kernel=kernel,
                                  tiles=groups if groups > 1 else None))
        routed += 1
    cleanup(gm, routed)
    if routed and inputs is not None:
        inputs.drop_unused(gm.graph, inputs_before)  # the dense mask's way in; its construction goes
    return routed


def attention_kernel(site: AttentionSite, choice: str) -> str | None:
    """Where a provably equivalent site runs: "sdpa" (SDPA's fused kernels, with
    ``is_causal`` or no mask), "flex", or None: it is an SDPA call without a mask already.

    Flash/cuDNN attention is faster than flex attention for the masks it has a flag for,
    so with ``choice="auto"`` only masks beyond those (padding, windows, documents,
    softcap, sinks) pay for flex; "flex" sends every site there."""
    if choice == "flex" or site.softcap is not None or site.sinks is not None:
        return "flex"
    if site.scale is not None and not (_is_number(site.scale) and site.scale > 0):
        return "flex"  # SDPA's kernels return NaN rows for a scale <= 0
    if site.mask is None:
        return "sdpa" if site.replaced else None  # the eager form is worth fusing even unmasked
    q_len, kv_len = tensor_value(site.q).shape[2], tensor_value(site.k).shape[2]
    return "sdpa" if is_plain_causal(site.mask) and same_size(q_len, kv_len) else "flex"


def head_groups(site: AttentionSite, kernel: str | None, choice: int | None, training: bool) -> tuple[int, str | None]:
    """(groups of heads SDPA runs over, a reason the site is left alone or None). More
    than one group only where SDPA's fused kernels run a backward: a training site that
    goes (or already goes) to SDPA."""
    if kernel not in ("sdpa", None) or not training:
        return 1, None
    qv, kv = tensor_value(site.q), tensor_value(site.k)
    kv_heads = kv.shape[1]
    if not isinstance(kv_heads, int) or qv.shape[1] % kv_heads:
        return 1, None
    if choice is None:
        return default_head_groups(nbytes(qv), kv_heads), None
    if kv_heads % choice:
        return 1, (f"attention_head_groups={choice} does not divide the {kv_heads} key/value heads "
                   f"(divisors: {', '.join(str(d) for d in range(1, kv_heads + 1) if kv_heads % d == 0)})")
    return choice, None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _not_routable_here(site, kernel: str | None, device_type: str, training: bool, in_checkpoint: bool) -> str | None:
    """Why a provably equivalent site still is not routed on this device (None: it is)."""
    if kernel is None:
        return "SDPA without a mask already: its fused kernels are the fastest route"
    if site.scale is not None and not _is_number(site.scale):
        return ("the softmax scale is a value of the graph, not a constant (dynamic=True makes module floats "
                "graph inputs); use dynamic=None or False")
    if kernel == "sdpa":
        return None  # SDPA's fused kernels: every device, training, any length
    q_len, kv_len = tensor_value(site.q).shape[2], tensor_value(site.k).shape[2]
    if not (isinstance(q_len, int) and isinstance(kv_len, int)) and not flex_versions.symbolic_lengths_supported():
        return ("dynamic sequence length: routing it to flex attention is not supported yet (inductor fails on it); "
                "torch.compile(..., dynamic=False) routes each length")
    if training and not flex_versions.flex_backward_supported(device_type):
        return (f"flex attention cannot run a backward on {device_type} with this torch; "
                "attention is routed there only where no gradient flows (eval, no_grad)")
    if site.replaced and in_checkpoint and not flex_versions.eager_form_in_checkpoint_supported(device_type):
        return (f"eager-form attention inside a checkpointed layer is not routed on {device_type} "
                "(a known fault on torch 2.11 CUDA); use attn_implementation='sdpa' or no layer checkpointing")
    if site.sinks is not None and not flex_versions.lse_in_compiled_graph(device_type):
        return (f"attention sinks need flex attention's log-sum-exp, which compiled flex attention "
                f"does not return on {device_type}")
    return None


def save_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Put a policy on a checkpointed layer that holds attention: the outputs of SDPA's
    fused kernels are saved for the backward instead of recomputed (see
    :mod:`tilepass.checkpoint_policy`). SDPA picks its kernel at run time; a site it runs on
    its math path keeps recomputing, which the record cannot see."""
    if ctx.root is None or gm is ctx.root:
        return 0
    if "checkpoint_calls" not in ctx.memo:  # once per pass, not once per layer body
        bodies = BodyInputs(ctx.root)
        ctx.memo["checkpoint_calls"] = bodies.calls, _checkpointed_attention_calls(ctx.root, bodies)
    calls_by_body, order = ctx.memo["checkpoint_calls"]
    calls = calls_by_body.get(gm.graph) or []
    if not calls or any(op_name(c) != "tag_activation_checkpoint" for c in calls):
        return 0  # not (only) a checkpointed layer's body
    sites = _attention_sites(gm.graph)
    if not sites:
        return 0
    module = common_module(sites).rsplit(".", 1)[0]  # "layers.0.self_attn" -> the layer, "layers.0"
    reason = _why_recomputed(gm, calls, sites, ctx, order)
    names = [n.meta.get(REPLACES, n.name) for n in sites]  # as Dynamo's graph (and the dump's page) names them
    if reason:
        ctx.records.append(Record("rejected", "checkpoint", module, "save_attention", ctx.graph_index,
                                  nodes=names, reason=reason))
        return 0
    checkpoint_policy.install(gm)
    ctx.records.append(Record("rewritten", "checkpoint", module, "save_attention", ctx.graph_index, nodes=names))
    return 1


def _why_recomputed(body: fx.GraphModule, calls: list[fx.Node], sites: list[fx.Node], ctx: PassContext,
                    order: list[fx.Node]) -> str | None:
    """Why this layer's attention is recomputed, or None; ``order``: the checkpointed layers
    with attention, in the order the graph runs them."""
    last = ctx.options.save_attention
    if last is not True:
        if not set(calls) <= set(order[-last:]):
            return (f"save_attention={last} keeps attention's outputs in the last {last} of this graph's "
                    f"{len(order)} checkpointed layers with attention (their backward runs first); "
                    "this one recomputes as before")
    if checkpoint_policy.has_policy(body):
        return "this checkpointed layer already has a policy (a context_fn): left as set"
    if any(n.target is attention_runtime.flex_sdpa for n in sites):
        return checkpoint_policy.FLEX_NOT_SAVED
    if any(_mask_requires_grad(n) for n in sites):
        return ("an attention mask here requires grad: SDPA runs its math path, which has no fused output "
                "to keep; recomputed as before")
    return None


def _attention_sites(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"
            and n.target in (F.scaled_dot_product_attention, attention_runtime.sdpa_head_groups, attention_runtime.flex_sdpa)]


def _checkpointed_attention_calls(root: fx.GraphModule, bodies: BodyInputs) -> list[fx.Node]:
    """The checkpoint calls whose body holds attention, in the order the graph runs them
    (calls in the captured graph itself first, then any nested ones)."""
    position = {n: i for i, n in enumerate(root.graph.nodes)}
    calls = [c for graph, cs in bodies.calls.items() if _attention_sites(graph)
             for c in cs if op_name(c) == "tag_activation_checkpoint"]
    return sorted(calls, key=lambda c: (c not in position, position.get(c, 0)))


def _mask_requires_grad(sdpa: fx.Node) -> bool:
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    value = tensor_value(mask) if isinstance(mask, fx.Node) else None
    return value is not None and value.requires_grad
