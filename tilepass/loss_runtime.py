"""The tiled loss: a sum over tokens, whose gradients are taken tile by tile in the forward.

This module knows nothing of FX. A *loss region* is a callable ``fn(x_tile, target_tile,
*params)`` returning a one-tuple: the tile's summed loss (a 0-d tensor), e.g. an LM head
and ``cross_entropy(..., reduction="sum")``. It is registered with
:func:`tilepass.runtime.register_region` and run by one opaque custom op:

* ``tilepass::tiled_loss(key, x, target, scale, params, num_tiles, tile_tokens, needs_grad)``
  runs ``fn`` on each tile with autograd and returns ``[loss, dx, *dparams]``: the loss
  summed over tiles, and the gradients of ``scale * loss``, ``dx`` written tile by tile
  and each parameter's gradient summed over tiles. Only one tile's logits (and their
  float32 copy and gradient) exist at a time; the full ``[tokens, vocab]`` logits never do.
* Its backward multiplies the gradients kept from the forward by ``grad / scale``, where
  ``grad`` is the incoming gradient of the loss, a scalar. No recompute, so the LM head's
  matmuls run three times per step, as in an untiled step (logits, then the gradients of
  input and weight).

``scale`` is the gradient the loss is expected to get: ``1 / count`` for a mean over
``count`` rows, which the graph divides by afterwards. The tile's logit gradients are then
rounded as eager rounds them (``(softmax - onehot) / count`` in the loss's dtype), and when
``grad == scale`` (``loss.backward()`` on the mean) the backward multiplies by exactly 1.

Why in the forward: the loss is the last op of the step, so its gradients are needed at
once, and saving ``dx`` instead of ``x`` costs the same memory. As with the tiled MLP, no
``.grad`` is touched and each parameter's gradient is returned once.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import compat
from .runtime import GradientSums, _autocast, in_fresh_thread, registered_region, tile_program, tile_sizes, write_rows


def run_tiled_loss(key: str, x: Tensor, target: Tensor, scale: Tensor, params: Sequence[Tensor], num_tiles: int,
                   tile_tokens: int, needs_grad: Sequence[bool]) -> list[Tensor]:
    """``[loss, dx, *dparams]``; a gradient whose ``needs_grad`` is False is an empty tensor."""
    region = registered_region(key)
    need_x, need_p = bool(needs_grad[0]), [bool(b) for b in needs_grad[1:]]
    training = need_x or any(need_p)
    program = tile_program(region)
    if region.compile_tile and compat.compiled_tiles_need_fresh_thread(x.device.type):
        grads = torch.enable_grad() if training else torch.no_grad()  # a fresh thread's dispatch state is the default
        return in_fresh_thread(x.device, _run_tiles, region, program, grads, x, target, scale, params,
                               num_tiles, tile_tokens, need_x, need_p)
    grads = compat.autograd_inside_custom_op() if training else torch.no_grad()
    return _run_tiles(region, program, grads, x, target, scale, params, num_tiles, tile_tokens, need_x, need_p)


def _run_tiles(region, fn, grad_mode, x: Tensor, target: Tensor, scale: Tensor, params: Sequence[Tensor],
               num_tiles: int, tile_tokens: int, need_x: bool, need_p: list[bool]) -> list[Tensor]:
    loss_dtype = region.outputs[0].dtype
    total = torch.zeros((), dtype=torch.float64, device=x.device)  # tile sums added once rounded
    dx = torch.empty_like(x) if need_x else None
    sums = GradientSums(params, need_p, region.accumulate_fp32, borrowed=(x, scale, *params))
    start = 0
    with grad_mode:
        leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
        wanted = [p for p, need in zip(leaves, need_p) if need]
        for size in tile_sizes(x.shape[0], num_tiles, tile_tokens):
            x_tile = x.narrow(0, start, size).detach().requires_grad_(need_x)
            with _autocast(region):
                (loss,) = fn(x_tile, target.narrow(0, start, size), *leaves)
            total += loss.detach().double()
            inputs = ([x_tile] if need_x else []) + wanted
            grads = iter([None] * len(inputs))
            if inputs and loss.requires_grad:
                grads = iter(torch.autograd.grad(loss, inputs, scale.to(loss.dtype), allow_unused=True))
            if need_x:
                write_rows(dx, start, size, next(grads))
            sums.add_tile([next(grads) if need else None for need in need_p])
            start += size
    return [total.to(loss_dtype), dx if need_x else x.new_empty(0), *sums.results(x)]


@torch.library.custom_op("tilepass::tiled_loss", mutates_args=())
def tiled_loss(key: str, x: Tensor, target: Tensor, scale: Tensor, params: list[Tensor], num_tiles: int,
               tile_tokens: int, needs_grad: list[bool]) -> list[Tensor]:
    return run_tiled_loss(key, x, target, scale, params, num_tiles, tile_tokens, needs_grad)


@tiled_loss.register_fake
def _tiled_loss_fake(key, x, target, scale, params, num_tiles, tile_tokens, needs_grad):
    region = registered_region(key)
    result = [x.new_empty((), dtype=region.outputs[0].dtype), torch.empty_like(x) if needs_grad[0] else x.new_empty(0)]
    result += [torch.empty_like(p) if need else x.new_empty(0) for p, need in zip(params, needs_grad[1:])]
    return result


def _setup_context(ctx, inputs, output):
    key, x, target, scale, params, num_tiles, tile_tokens, needs_grad = inputs
    ctx.needs_grad = list(needs_grad)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(scale, *output[1:])


def _backward(ctx, grads):
    grad = grads[0]  # the others are the gradients themselves: not differentiable
    scale, dx, *dparams = ctx.saved_tensors
    # grad == scale is the common case (loss.backward() on the mean): exactly 1, also
    # where scale is inf (every label ignored), where eager's gradients are all 0.
    factor = torch.where(grad == scale, torch.ones_like(grad), grad / scale)
    scaled = [g * factor.to(g.dtype) if need else None for g, need in zip([dx, *dparams], ctx.needs_grad)]
    return None, scaled[0], None, None, scaled[1:], None, None, None


tiled_loss.register_autograd(_backward, setup_context=_setup_context)
