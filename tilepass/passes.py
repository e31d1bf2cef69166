"""Graph passes and the runner that applies them.

Every pass has one signature, ``fn(gm, ctx) -> int``: it rewrites ``gm.graph`` in place,
appends one :class:`~tilepass.report.Record` per candidate to ``ctx.records`` and
returns how many rewrites it made. The runner logs, times, and skips a pass whose
option switch is off.
"""
from __future__ import annotations

import dataclasses
import operator
import time
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import attention_runtime, checkpoint_policy, flex_versions, loss_runtime, runtime
from .match_loss import LossMatch, find_losses
from .match_attention import AttentionSite, find_attention, is_plain_causal, same_size
from .fx_utils import autocast_state, common_module, hint, op_name, remove_dead_nodes, tensor_value
from .hop_inputs import BodyInputs
from .match_mlp import find_mlps
from .match_moe import find_moes
from .options import Options, default_head_groups, default_loss_tiles, default_num_tiles
from .region import build_layout_program, build_loss_program, build_tile_program, program_key
from .report import Record, logger
from .rewrite import hoist_before, splice_tiled_region


@dataclasses.dataclass
class PassContext:
    options: Options
    graph_index: int
    records: list[Record] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    programs: dict[str, str] = dataclasses.field(default_factory=dict)  # region key -> tile program code
    on_stage: Callable[[str, fx.GraphModule], None] | None = None  # called with the graph after each pass
    inductor_patches: dict = dataclasses.field(default_factory=dict)  # config the downstream compile needs
    root: fx.GraphModule | None = None  # the graph Dynamo captured (passes also see its nested bodies)


Pass = Callable[[fx.GraphModule, PassContext], int]


def resolve_tiles(options: Options, num_tokens: int, in_features: int, intermediate: int,
                  default=default_num_tiles) -> tuple[int, int]:
    """(num_tiles, tile_tokens) for the tiled op: exactly one of them is non-zero."""
    if options.tile_tokens is not None:
        return 0, options.tile_tokens
    if options.num_tiles is not None:
        return options.num_tiles, 0
    return default(num_tokens, in_features, intermediate), 0


def _nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return hint(t.numel()) * t.element_size()


def _reject(ctx: PassContext, kind: str, rejections) -> None:
    for r in rejections:
        ctx.records.append(Record("rejected", kind, r.module, r.pattern, ctx.graph_index,
                                  reason=r.reason, nodes=[n.name for n in r.nodes]))


def _tile_region(gm: fx.GraphModule, ctx: PassContext, kind: str, m, program: fx.GraphModule,
                 specs: list, cast, tokens: int, width: int, outputs: list, intermediates: list,
                 uses_rng: bool = False) -> None:
    """Register ``program`` as a tiled region, splice it over ``m``'s nodes, record it."""
    num_tiles, tile_tokens = resolve_tiles(ctx.options, tokens, m.in_features, width)
    sizes = runtime.tile_sizes(tokens, num_tiles, tile_tokens)
    key = program_key(kind, program, (specs, cast, ctx.options.accumulate_fp32, uses_rng))
    runtime.register_region(key, runtime.RegisteredRegion(program, tuple(specs), cast, ctx.options.accumulate_fp32, uses_rng))
    ctx.programs[key] = program.code
    splice_tiled_region(gm.graph, key, m.source, m.params, outputs, num_tiles, tile_tokens, m.nodes[0])
    inter = sum(_nbytes(tensor_value(n)) for n in intermediates)
    ctx.records.append(Record(
        "rewritten", kind, m.module, m.pattern, ctx.graph_index, tiles=len(sizes),
        tile_tokens=max(sizes) if sizes else 0, tokens=tokens, nodes=[n.name for n in m.nodes],
        region_key=key, intermediate_bytes=inter,
        saved_bytes=inter - (inter * max(sizes) // tokens if tokens else 0),
    ))


def _cleanup(gm: fx.GraphModule, rewrites: int) -> int:
    if rewrites:
        remove_dead_nodes(gm.graph)  # the replaced regions (and a routed dense mask) go
        gm.graph.lint()
        gm.recompile()
    return rewrites


def tile_mlps(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite every dense MLP into a sequence-tiled, recomputed region."""
    matches, rejections = find_mlps(gm.graph)
    autocast = autocast_state(gm.graph)
    _reject(ctx, "mlp", rejections)
    for m in matches:
        program = build_tile_program(m.nodes, m.token_inputs, m.params, [m.output], m.num_tokens)
        out = tensor_value(m.output)
        spec = runtime.OutputSpec(tuple(int(s) for s in out.shape[-1:]), out.dtype)
        _tile_region(gm, ctx, "mlp", m, program, [spec], autocast.get(m.down), hint(m.num_tokens),
                     m.intermediate, [m.output], m.ups + m.inner, uses_rng=m.uses_rng)
    return _cleanup(gm, len(matches))


def tile_moes(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite every MoE block (router included) into one sequence-tiled region."""
    matches, rejections = find_moes(gm.graph)
    autocast = autocast_state(gm.graph)
    _reject(ctx, "moe", rejections)
    for m in matches:
        program = build_layout_program(m.nodes, m.source, m.params, m.outputs, m.layouts)
        specs = [runtime.OutputSpec(tuple(int(s) for s in tensor_value(o).shape[m.layouts[o].row_dims:]),
                                    tensor_value(o).dtype) for o in m.outputs]
        _tile_region(gm, ctx, "moe", m, program, specs, autocast.get(m.nodes[0]), m.num_tokens,
                     m.expanded_width, m.outputs, m.nodes)
    return _cleanup(gm, len(matches))


def tile_losses(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite every LM head + cross-entropy into one tiled loss region (see
    :mod:`tilepass.loss_runtime`): the full-sequence logits are computed only where the
    graph also returns them, in the model's dtype, and dropped with ``skip_logits``."""
    matches, rejections = find_losses(gm.graph)
    autocast = autocast_state(gm.graph)
    _reject(ctx, "loss", rejections)
    for m in matches:
        _tile_loss(gm, ctx, m, autocast.get(m.head))
    return _cleanup(gm, len(matches))


def _tile_loss(gm: fx.GraphModule, ctx: PassContext, m: LossMatch, cast) -> None:
    graph = gm.graph
    loss_value, src = tensor_value(m.loss), tensor_value(m.source)
    loss_kwargs = dict(ignore_index=m.ignore_index, reduction="sum", label_smoothing=m.label_smoothing)
    program = build_loss_program(m.chain, m.source, m.params, m.num_tokens, F.cross_entropy, loss_kwargs)
    spec = runtime.OutputSpec((), loss_value.dtype)
    compiled = ctx.options.compile_loss_tile(src.device.type)
    key = program_key("loss", program, (cast, ctx.options.accumulate_fp32, compiled))
    runtime.register_region(key, runtime.RegisteredRegion(program, (spec,), cast, ctx.options.accumulate_fp32,
                                                          compile_tile=compiled))
    ctx.programs[key] = program.code
    tokens = hint(m.num_tokens)
    num_tiles, tile_tokens = resolve_tiles(ctx.options, tokens, m.in_features, m.vocab, default_loss_tiles)
    # The loss's own traced value says whether gradients flow (under no_grad a parameter
    # still requires grad, but nothing computed from it does).
    flows = bool(loss_value.requires_grad)
    needs_grad = [flows and bool(src.requires_grad)] + [
        flows and bool(getattr(tensor_value(p), "requires_grad", False)) for p in m.params]
    meta = {k: m.head.meta[k] for k in ("nn_module_stack",) if k in m.head.meta}
    divisor = _loss_divisor(m)
    if isinstance(divisor, fx.Node):
        hoist_before(graph, m.loss, [divisor])  # `num_items_in_batch.to(device)` follows the loss
    with graph.inserting_before(m.loss):
        x2d = graph.call_method("reshape", (m.source, -1, m.in_features))
        target = graph.call_method("reshape", (m.target, -1))
        if m.reduction == "mean":  # as F.cross_entropy's mean: over the rows not ignored
            divisor = graph.call_method("sum", (graph.call_method("ne", (target, m.ignore_index)),))
        scale = graph.call_function(torch.ones, ((),), dict(dtype=loss_value.dtype, device=src.device))
        if divisor is not None:
            scale = graph.call_function(operator.truediv, (scale, divisor))
        call = graph.call_function(loss_runtime.tiled_loss._opoverload,
                                   (key, x2d, target, scale, list(m.params), num_tiles, tile_tokens, needs_grad))
        total = graph.call_function(operator.getitem, (call, 0))
        result = graph.call_function(operator.truediv, (total, divisor)) if m.reduction == "mean" else total
    x2d.meta.update(meta, example_value=src.reshape(-1, m.in_features))
    target.meta.update(example_value=tensor_value(m.target).reshape(-1))
    total.meta.update(meta, example_value=loss_value)
    result.meta.update(meta, example_value=loss_value)
    m.loss.replace_all_uses_with(result)
    outside = m.read_outside()
    training = any(needs_grad)
    # only the captured graph's own outputs reach the caller (a nested body's feed its op)
    if ctx.options.skip_logits and training and (ctx.root is None or gm is ctx.root):
        _drop_returned(graph, outside)
        outside = m.read_outside()
    sizes = runtime.tile_sizes(tokens, num_tiles, tile_tokens)
    inter = sum(_nbytes(tensor_value(n)) for n in m.chain)
    kept = sum(_nbytes(tensor_value(n)) for n in outside)
    ctx.records.append(Record(
        "rewritten", "loss", m.module, m.pattern, ctx.graph_index, tiles=len(sizes),
        tile_tokens=max(sizes) if sizes else 0, tokens=tokens, nodes=[n.name for n in m.nodes],
        region_key=key, intermediate_bytes=inter, logits_bytes=kept, kernel="compiled" if compiled else None,
        saved_bytes=max(0, inter - kept - (inter * max(sizes) // tokens if tokens else 0)),
    ))


def _loss_divisor(m: LossMatch):
    """What a summed loss is divided by next (``/ num_items_in_batch``, as transformers'
    Trainer passes it), or None: the gradient the loss is expected to get is its inverse."""
    users = list(m.loss.users)
    if m.reduction == "sum" and len(users) == 1 and users[0].op == "call_function" \
            and users[0].target in (operator.truediv, torch.div) and len(users[0].args) == 2 \
            and users[0].args[0] is m.loss and not users[0].kwargs:
        return users[0].args[1]
    return None


def _drop_returned(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """``None`` in the graph's outputs in place of ``nodes`` (skip_logits: Liger's semantics)."""
    drop = set(nodes)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    output.args = fx.node.map_arg(output.args, lambda n: None if n in drop else n)


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
    _cleanup(gm, routed)
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
        return default_head_groups(_nbytes(qv), kv_heads), None
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
    calls = BodyInputs(ctx.root).calls.get(gm.graph) or []
    if not calls or any(op_name(c) != "tag_activation_checkpoint" for c in calls):
        return 0  # not (only) a checkpointed layer's body
    sites = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (F.scaled_dot_product_attention, attention_runtime.sdpa_head_groups, attention_runtime.flex_sdpa)]
    if not sites:
        return 0
    module = common_module(sites).rsplit(".", 1)[0]  # "layers.0.self_attn" -> the layer, "layers.0"
    reason = None
    if checkpoint_policy.has_policy(gm):
        reason = "this checkpointed layer already has a policy (a context_fn): left as set"
    elif any(n.target is attention_runtime.flex_sdpa for n in sites):
        reason = checkpoint_policy.FLEX_NOT_SAVED
    elif any(_mask_requires_grad(n) for n in sites):
        reason = ("an attention mask here requires grad: SDPA runs its math path, which has no fused output "
                  "to keep; recomputed as before")
    names = [n.meta.get(REPLACES, n.name) for n in sites]  # as Dynamo's graph (and the dump's page) names them
    if reason:
        ctx.records.append(Record("rejected", "checkpoint", module, "save_attention", ctx.graph_index,
                                  nodes=names, reason=reason))
        return 0
    checkpoint_policy.install(gm)
    ctx.records.append(Record("rewritten", "checkpoint", module, "save_attention", ctx.graph_index, nodes=names))
    return 1


def _mask_requires_grad(sdpa: fx.Node) -> bool:
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    value = tensor_value(mask) if isinstance(mask, fx.Node) else None
    return value is not None and value.requires_grad


# name -> (pass, the option that switches it); MoE first, so that a shared expert (a
# dense MLP inside the block) is tiled with its block.
PASSES: dict[str, tuple[Pass, str]] = {
    "moe": (tile_moes, "moe"),
    "mlp": (tile_mlps, "mlp"),
    "loss": (tile_losses, "loss"),
    "attention": (route_attention, "attention"),
    "save_attention": (save_attention, "save_attention"),
}


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and every graph nested in it: the bodies of higher-order ops such as the
    ``tag_activation_checkpoint`` that layer checkpointing becomes under Dynamo."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> int:
    total = 0
    ctx.root = gm
    if ctx.on_stage:
        ctx.on_stage("dynamo", gm)
    for name, (fn, switch) in PASSES.items():
        if not ctx.options.enabled(switch):
            logger.debug("tilepass: pass %s disabled by option %r", name, switch)
            continue
        t0 = time.perf_counter()
        count = sum(fn(sub, ctx) for sub in graph_modules(gm))
        ctx.timings[name] = time.perf_counter() - t0
        logger.debug("tilepass: pass %s made %d rewrites in %.3fs", name, count, ctx.timings[name])
        if ctx.on_stage:
            ctx.on_stage(f"after_{name}", gm)
        total += count
    return total
