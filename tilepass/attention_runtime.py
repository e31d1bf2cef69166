"""Routed attention at run (and trace) time: build the BlockMask, call flex_attention.

:func:`flex_sdpa` replaces a ``scaled_dot_product_attention`` call in the graph. It is a
plain function: AOTAutograd traces through it, so ``create_block_mask`` and the
``flex_attention`` higher-order op land in the graph inductor compiles (and the mask
program's ops are traced into the mask_mod subgraph, never into an O(seq²) tensor of the
training graph). Knows nothing of FX matching.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import flex_versions

_MASKS: dict[str, Callable[..., Tensor]] = {}


@torch.library.custom_op("tilepass::realize", mutates_args=())
def realize(x: Tensor) -> Tensor:
    """A copy inductor cannot fuse away: it hands the flex kernel a real buffer."""
    return x.clone()


@realize.register_fake
def _realize_fake(x):
    return torch.empty_like(x)


def register_mask(key: str, program: Callable[..., Tensor]) -> None:
    _MASKS[key] = program


def clear_masks() -> None:
    _MASKS.clear()


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _padded(q: Tensor, k: Tensor, v: Tensor, mask_mod, multiple: int):
    """q, k, v zero-padded along the sequence to a multiple of ``multiple``, and a mask_mod
    over the padded lengths: padded keys are masked, and the mask program only ever sees
    indices of real positions (padded queries read the last row's, then are sliced off), so
    the data it indexes is never read out of bounds."""
    q_len, kv_len = q.shape[2], k.shape[2]

    def pad(t: Tensor, n: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, -n % multiple))  # [B, H, n→padded, D]

    def padded_mask_mod(b, h, q_idx, kv_idx):
        real = kv_idx < kv_len
        if mask_mod is None:
            return real
        q_last, kv_last = torch.full_like(q_idx, q_len - 1), torch.full_like(kv_idx, kv_len - 1)
        return real & mask_mod(b, h, torch.minimum(q_idx, q_last), torch.minimum(kv_idx, kv_last))

    return pad(q, q_len), pad(k, kv_len), pad(v, kv_len), padded_mask_mod


def sdpa_head_groups(q: Tensor, k: Tensor, v: Tensor, *, groups: int, is_causal: bool, scale: float | None,
                     enable_gqa: bool) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)`` as
    one call per group of heads ([B, H, S, D]; ``groups`` divides the key/value heads, so
    each group keeps its queries with their own key/value heads). Heads are independent,
    so the output is the same; each call's backward needs 1/groups of the work memory.
    The groups' outputs are joined in SDPA's own layout ([B, S, H, D] in memory), so the
    usual ``transpose(1, 2).reshape(B, S, H * D)`` after it stays a view."""
    extra = {"enable_gqa": True} if enable_gqa else {}
    qs, ks, vs = (t.split(t.shape[1] // groups, dim=1) for t in (q, k, v))
    outs = [torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=is_causal, scale=scale, **extra)
            for qg, kg, vg in zip(qs, ks, vs)]
    return torch.cat([o.transpose(1, 2) for o in outs], dim=2).transpose(1, 2)


def flex_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    data: Sequence[Tensor],
    *,
    mask_key: str | None,
    causal: bool,
    scale: float | None,
    enable_gqa: bool,
    per_batch: bool,
    per_head: bool,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal, scale, enable_gqa)`` as
    flex attention, the mask given by a registered mask program over ``data``.

    ``sinks`` ([H], GPT-OSS): one extra logit per head that takes part in the softmax and is
    dropped after it. With ``lse`` the log-sum-exp of the real keys, the weights of the
    keys shrink by ``exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``, so
    ``out * sigmoid(lse - sink)`` is exact (and differentiable in q, k, v and the sinks)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if flex_versions.mask_buffers_must_be_realized(q.device.type):
        data = [realize(d) for d in data]
    if causal:
        mask_mod = _causal
    elif mask_key is not None:
        program = _MASKS[mask_key]

        def mask_mod(b, h, q_idx, kv_idx):
            return program(b, h, q_idx, kv_idx, *data)
    else:
        mask_mod = None
    q_len, kv_len = q.shape[2], k.shape[2]
    multiple = flex_versions.length_multiple(q.device.type)
    padded = bool(multiple) and bool(q_len % multiple or kv_len % multiple)
    if padded:
        q, k, v, mask_mod = _padded(q, k, v, mask_mod, multiple)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(
            mask_mod, q.shape[0] if per_batch else None, q.shape[1] if per_head else None,
            q.shape[2], k.shape[2], device=q.device,
        )
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # traced here, compiled by inductor: not the eager path it warns about
        args = (q.contiguous(), k.contiguous(), v.contiguous())
        kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
        if sinks is None:
            out = flex_attention(*args, **kwargs)
            return out[:, :, :q_len] if padded else out
        out, lse = flex_versions.unpack_lse(flex_attention(*args, **kwargs, **flex_versions.lse_kwargs()))
    if padded:
        out, lse = out[:, :, :q_len], lse[:, :, :q_len]
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # [B, H, Q]
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)
