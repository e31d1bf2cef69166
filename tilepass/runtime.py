"""The tiled runtime: run a row-wise region tile by tile along the token dimension.

This module knows nothing of FX. A *region* is any callable ``fn(x_tile, *params)``
returning a tuple of tensors whose first dimension is the tile's tokens, registered
under a string key. Two opaque custom ops execute it:

* ``tilepass::tiled_forward(key, x, params, num_tiles, tile_tokens)`` runs ``fn`` on each
  tile under ``no_grad`` and writes each output into a preallocated ``[N, ...]`` buffer.
  Autograd saves only ``x`` and ``params``.
* ``tilepass::tiled_backward(...)`` recomputes one tile at a time with autograd, writes
  the tile's input gradient into ``dx`` and adds the tile's parameter gradients into
  one accumulator per parameter, returned once. No ``.grad`` is touched and no hook is
  installed, so DDP/FSDP/ZeRO and graph capture see exactly one gradient per parameter.

Why custom ops and not an ``autograd.Function``: AOTAutograd traces through an
``autograd.Function``, and its CSE merges the backward's recompute with the forward,
after which the partitioner saves every tile's intermediates again (measured on torch
2.13: 80 MiB saved instead of 16 MiB). An opaque op is a boundary no downstream pass
can see through, so the saving survives AOTAutograd and inductor by construction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import compat

RegionFn = Callable[..., Sequence[Tensor]]


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Shape (after the token dim) and dtype of one region output."""

    feature_shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class RegisteredRegion:
    fn: RegionFn
    outputs: tuple[OutputSpec, ...]
    # (device_type, dtype) when the region ran under torch.autocast in the model.
    autocast: tuple[str, torch.dtype] | None = None
    # Sum weight gradients over tiles in float32 (then cast once to the param dtype).
    accumulate_fp32: bool = False
    # The region draws random numbers (dropout): the forward returns the generator state
    # it started from as an extra output, and the backward replays the tiles from it.
    uses_rng: bool = False
    # Run each tile through ``torch.compile(fn)`` (inductor) instead of eagerly; see
    # :func:`tile_program`.
    compile_tile: bool = False
    compiled_fn: Optional[RegionFn] = dataclasses.field(default=None, repr=False, compare=False)


_REGIONS: dict[str, RegisteredRegion] = {}


def register_region(key: str, region: RegisteredRegion) -> None:
    """Make ``key`` callable through the tiled ops. Re-registering a key replaces it;
    keys are content hashes, so equal keys describe equal computations."""
    _REGIONS[key] = region


def clear_regions() -> None:
    _REGIONS.clear()


def registered_region(key: str) -> RegisteredRegion:
    try:
        return _REGIONS[key]
    except KeyError:
        raise RuntimeError(
            f"tilepass region {key!r} is not registered in this process. A compiled graph "
            "that uses it outlived tilepass.reset(); call torch._dynamo.reset() (or "
            "tilepass.reset(), which does both) and run the model again."
        ) from None


def tile_program(region: RegisteredRegion) -> RegionFn:
    """What one tile runs: the region's program, or (``compile_tile``) that program compiled
    by inductor on first use. Tile shapes take at most two values per call (the last tile
    may be shorter); Dynamo's automatic dynamic shapes make the second compile cover any
    other length, so varying sequence lengths do not recompile per step."""
    if not region.compile_tile:
        return region.fn
    if region.compiled_fn is None:
        program = region.fn

        def run_tile(*args):
            return program(*args)

        # Dynamo skips the frames of a GraphModule's own call, so it starts from this one; a
        # code object per region gives each region its own compile cache (and recompile limit)
        run_tile.__code__ = run_tile.__code__.replace()
        region.compiled_fn = torch.compile(run_tile, backend="inductor", fullgraph=True)
    return region.compiled_fn


def in_fresh_thread(device: torch.device, fn: Callable, *args):
    """``fn(*args)`` in a new thread, on the caller's device and CUDA stream, and wait for
    it. The new thread starts from the default dispatch state, grad mode and autocast state
    (they are thread-local): ``fn`` sets what it needs itself."""
    result: dict = {}
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def target():
        try:
            with contextlib.ExitStack() as on_callers_stream:
                if stream is not None:
                    on_callers_stream.enter_context(torch.cuda.device(device))
                    on_callers_stream.enter_context(torch.cuda.stream(stream))
                result["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="tilepass-tiles")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def tile_sizes(num_tokens: int, num_tiles: int = 0, tile_tokens: int = 0) -> list[int]:
    """Explicit split sizes along the token dimension.

    With ``num_tiles=k`` the result has exactly ``min(k, num_tokens)`` tiles whose sizes
    differ by at most one (unlike ``torch.chunk``, which may return fewer chunks than
    asked). With ``tile_tokens=t`` every tile has ``t`` tokens except a shorter last one.
    """
    if num_tokens <= 0:
        return []
    if tile_tokens > 0:
        full, rest = divmod(num_tokens, tile_tokens)
        return [tile_tokens] * full + ([rest] if rest else [])
    k = max(1, min(num_tiles, num_tokens))
    base, extra = divmod(num_tokens, k)
    return [base + 1] * extra + [base] * (k - extra)


def _autocast(region: RegisteredRegion):
    if region.autocast is None:
        return contextlib.nullcontext()
    device_type, dtype = region.autocast
    return torch.autocast(device_type, dtype=dtype)


def rng_state(device: torch.device) -> Tensor:
    """The state of the generator that ops on ``device`` draw from (a CPU byte tensor)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return getattr(torch, device.type).get_rng_state(device)


def set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


def run_tiled_forward(key: str, x: Tensor, params: Sequence[Tensor], num_tiles: int, tile_tokens: int) -> list[Tensor]:
    region = registered_region(key)
    n = x.shape[0]
    outs = [x.new_empty((n, *spec.feature_shape), dtype=spec.dtype) for spec in region.outputs]
    if region.uses_rng:
        outs.append(rng_state(x.device).clone())  # where this forward's random draws start
    start = 0
    with torch.no_grad(), _autocast(region):
        for size in tile_sizes(n, num_tiles, tile_tokens):
            tile_outs = region.fn(x.narrow(0, start, size), *params)
            for buf, out in zip(outs, tile_outs):
                buf.narrow(0, start, size).copy_(out)
            start += size
    return outs


def run_tiled_backward(
    key: str,
    x: Tensor,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    num_tiles: int,
    tile_tokens: int,
    needs_grad: Sequence[bool],
    rng: Tensor | None = None,
) -> list[Tensor]:
    """Gradients ``[dx, *dparams]``; an entry whose ``needs_grad`` is False is an empty tensor.

    With ``rng`` (the state the forward started from) the tiles are recomputed from that
    state, in the forward's order, so every dropout mask is the one the forward used; the
    caller's generator state is restored afterwards.
    """
    region = registered_region(key)
    if rng is not None:
        saved = rng_state(x.device)
        set_rng_state(x.device, rng)
        try:
            return run_tiled_backward(key, x, params, grads, num_tiles, tile_tokens, needs_grad)
        finally:
            set_rng_state(x.device, saved)
    n = x.shape[0]
    need_x, need_p = bool(needs_grad[0]), [bool(b) for b in needs_grad[1:]]
    dx = torch.empty_like(x) if need_x else None
    sums = GradientSums(params, need_p, region.accumulate_fp32, borrowed=(x, *params, *grads))
    with compat.autograd_inside_custom_op():
        # Detached leaves: autograd.grad below returns their per-tile gradients without
        # ever writing a .grad anywhere.
        leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
        wanted = [p for p, need in zip(leaves, need_p) if need]
        start = 0
        for size in tile_sizes(n, num_tiles, tile_tokens):
            x_tile = x.narrow(0, start, size).detach().requires_grad_(need_x)
            with _autocast(region):
                outs = region.fn(x_tile, *leaves)
            pairs = [(o, g.narrow(0, start, size)) for o, g in zip(outs, grads) if o.requires_grad]
            inputs = ([x_tile] if need_x else []) + wanted
            if pairs and inputs:
                tile_grads = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True
                )
            else:
                tile_grads = (None,) * len(inputs)
            it = iter(tile_grads)
            if need_x:
                write_rows(dx, start, size, next(it))
            sums.add_tile([next(it) if need else None for need in need_p])
            start += size
    return [dx if need_x else x.new_empty(0), *sums.results(x)]


def write_rows(dx: Tensor, start: int, size: int, g: Tensor | None) -> None:
    """A tile's input gradient into its rows of ``dx`` (zeros where autograd gave None)."""
    rows = dx.narrow(0, start, size)
    rows.zero_() if g is None else rows.copy_(g)


class GradientSums:
    """One gradient per parameter, summed over tiles and returned once (the regions'
    contract: no ``.grad`` written, no hook, one gradient per parameter per call)."""

    def __init__(self, params: Sequence[Tensor], needs: Sequence[bool], accumulate_fp32: bool,
                 borrowed: Sequence[Tensor] = ()):
        self.params, self.needs, self.fp32 = list(params), list(needs), accumulate_fp32
        self.sums: list[Tensor | None] = [None] * len(self.params)
        self.borrowed = {t.untyped_storage().data_ptr() for t in borrowed}

    def add_tile(self, grads: Sequence[Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None or not self.needs[i]:
                continue
            if self.sums[i] is None:
                # Own the sum: autograd may hand back a view of an incoming gradient (e.g.
                # for ``x + bias``), which later add_ calls must not touch.
                owned = self.fp32 or g.untyped_storage().data_ptr() in self.borrowed
                wide = self.fp32 and g.dtype in (torch.bfloat16, torch.float16)  # never narrower
                self.sums[i] = g.to(torch.float32 if wide else g.dtype, copy=True) if owned else g
            else:
                self.sums[i].add_(g)

    def results(self, like: Tensor) -> list[Tensor]:
        """Each parameter's sum in its dtype; zeros if no tile reached it, an empty tensor
        where no gradient is needed. A custom op's outputs may not alias its inputs."""
        out = []
        for p, s, need in zip(self.params, self.sums, self.needs):
            if not need:
                out.append(like.new_empty(0))
            elif s is None:
                out.append(torch.zeros_like(p))
            else:
                out.append(s.to(p.dtype) if s.dtype != p.dtype else s)
        return out


# --- the custom ops -----------------------------------------------------------------


@torch.library.custom_op("tilepass::tiled_forward", mutates_args=())
def tiled_forward(key: str, x: Tensor, params: list[Tensor], num_tiles: int, tile_tokens: int) -> list[Tensor]:
    return run_tiled_forward(key, x, params, num_tiles, tile_tokens)


@tiled_forward.register_fake
def _tiled_forward_fake(key, x, params, num_tiles, tile_tokens):
    region = registered_region(key)
    n = x.shape[0]
    outs = [x.new_empty((n, *spec.feature_shape), dtype=spec.dtype) for spec in region.outputs]
    if region.uses_rng:
        outs.append(torch.empty(_rng_state_size(x.device), dtype=torch.uint8, device="cpu"))
    return outs


def _rng_state_size(device: torch.device) -> int:
    if device.type == "cpu":
        return torch.get_rng_state().numel()
    return getattr(torch, device.type).get_rng_state(device).numel()


@torch.library.custom_op("tilepass::tiled_backward", mutates_args=())
def tiled_backward(
    key: str,
    x: Tensor,
    params: list[Tensor],
    grads: list[Tensor],
    num_tiles: int,
    tile_tokens: int,
    needs_grad: list[bool],
    rng: Optional[Tensor] = None,
) -> list[Tensor]:
    return run_tiled_backward(key, x, params, grads, num_tiles, tile_tokens, needs_grad, rng)


@tiled_backward.register_fake
def _tiled_backward_fake(key, x, params, grads, num_tiles, tile_tokens, needs_grad, rng=None):
    result = [torch.empty_like(x) if needs_grad[0] else x.new_empty(0)]
    result += [torch.empty_like(p) if need else x.new_empty(0) for p, need in zip(params, needs_grad[1:])]
    return result


def _setup_context(ctx, inputs, output):
    key, x, params, num_tiles, tile_tokens = inputs
    ctx.key, ctx.num_tiles, ctx.tile_tokens = key, num_tiles, tile_tokens
    ctx.needs_grad = [bool(x.requires_grad)] + [bool(p.requires_grad) for p in params]
    ctx.uses_rng = registered_region(key).uses_rng
    data = output[:-1] if ctx.uses_rng else output
    ctx.out_meta = [(o.shape, o.dtype) for o in data]
    ctx.save_for_backward(x, *params, *(output[-1:] if ctx.uses_rng else ()))


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    rng = saved.pop() if ctx.uses_rng else None
    x, *params = saved
    grads = [
        torch.zeros(shape, dtype=dtype, device=x.device) if g is None else g
        for g, (shape, dtype) in zip(grads, ctx.out_meta)
    ]
    result = torch.ops.tilepass.tiled_backward(
        ctx.key, x, params, grads, ctx.num_tiles, ctx.tile_tokens, ctx.needs_grad, rng
    )
    dx = result[0] if ctx.needs_grad[0] else None
    dparams = [g if need else None for g, need in zip(result[1:], ctx.needs_grad[1:])]
    return None, dx, dparams, None, None


tiled_forward.register_autograd(_backward, setup_context=_setup_context)
