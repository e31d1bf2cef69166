"""Graph passes and the runner that applies them.

Every pass has one signature, ``fn(gm, ctx) -> int``: it rewrites ``gm.graph`` in place,
appends one :class:`~tilepass.report.Record` per candidate to ``ctx.records`` and
returns how many rewrites it made. The runner logs, times, and skips a pass whose
option switch is off.
"""
from __future__ import annotations

import operator
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import loss_runtime, runtime
from .attention_passes import route_attention, save_attention
from .fx_utils import autocast_state, hint, tensor_value
from .match_loss import LossMatch, find_losses
from .match_mlp import find_mlps
from .match_moe import find_moes
from .options import default_loss_tiles, default_mlp_tiles, default_num_tiles
from .pass_context import Pass, PassContext, cleanup, nbytes, resolve_tiles  # noqa: F401  (PassContext: the backend's)
from .region import build_layout_program, build_loss_program, build_tile_program, program_key
from .report import Record, logger
from .rewrite import hoist_before, splice_tiled_region


def _reject(ctx: PassContext, kind: str, rejections) -> None:
    for r in rejections:
        ctx.records.append(Record("rejected", kind, r.module, r.pattern, ctx.graph_index,
                                  reason=r.reason, nodes=[n.name for n in r.nodes]))


def _tile_region(gm: fx.GraphModule, ctx: PassContext, kind: str, m, program: fx.GraphModule,
                 specs: list, cast, tokens: int, width: int, outputs: list, intermediates: list,
                 uses_rng: bool = False, default=default_num_tiles) -> None:
    """Register ``program`` as a tiled region, splice it over ``m``'s nodes, record it."""
    num_tiles, tile_tokens = resolve_tiles(ctx.options, tokens, m.in_features, width, default)
    sizes = runtime.tile_sizes(tokens, num_tiles, tile_tokens)
    key = program_key(kind, program, (specs, cast, ctx.options.accumulate_fp32, uses_rng))
    runtime.register_region(key, runtime.RegisteredRegion(program, tuple(specs), cast, ctx.options.accumulate_fp32, uses_rng))
    ctx.programs[key] = program.code
    splice_tiled_region(gm.graph, key, m.source, m.params, outputs, num_tiles, tile_tokens, m.nodes[0])
    inter = sum(nbytes(tensor_value(n)) for n in intermediates)
    ctx.records.append(Record(
        "rewritten", kind, m.module, m.pattern, ctx.graph_index, tiles=len(sizes),
        tile_tokens=max(sizes) if sizes else 0, tokens=tokens, nodes=[n.name for n in m.nodes],
        region_key=key, intermediate_bytes=inter,
        saved_bytes=inter - (inter * max(sizes) // tokens if tokens else 0),
    ))


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
                     m.intermediate, [m.output], m.ups + m.inner, uses_rng=m.uses_rng, default=default_mlp_tiles)
    return cleanup(gm, len(matches))


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
                     m.expanded_width, m.outputs, m.nodes, uses_rng=m.uses_rng)
    return cleanup(gm, len(matches))


def tile_losses(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite every LM head + cross-entropy into one tiled loss region (see
    :mod:`tilepass.loss_runtime`): the full-sequence logits are computed only where the
    graph also returns them, in the model's dtype, and dropped with ``skip_logits``."""
    matches, rejections = find_losses(gm.graph)
    autocast = autocast_state(gm.graph)
    _reject(ctx, "loss", rejections)
    for m in matches:
        _tile_loss(gm, ctx, m, autocast.get(m.head))
    return cleanup(gm, len(matches))


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
    inter = sum(nbytes(tensor_value(n)) for n in m.chain)
    kept = sum(nbytes(tensor_value(n)) for n in outside)
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
        ctx.memo.clear()
        count = sum(fn(sub, ctx) for sub in graph_modules(gm))
        ctx.timings[name] = time.perf_counter() - t0
        logger.debug("tilepass: pass %s made %d rewrites in %.3fs", name, count, ctx.timings[name])
        if ctx.on_stage:
            ctx.on_stage(f"after_{name}", gm)
        total += count
    return total
