"""Selective activation checkpointing: keep attention's outputs in a checkpointed layer.

With layer checkpointing, a layer's forward runs twice: once in the forward pass and
once, recomputed, in the backward. Attention is most of a long-sequence layer's time, and
its backward needs only its inputs (cheap to recompute: a norm, three projections, RoPE)
and its outputs (the attention output and the log-sum-exp). Saving those outputs skips the
second attention forward, at a cost per token per layer of ``heads * head_dim`` elements
of the activation dtype plus ``heads`` float32s (4.1 KB for Llama-3.2-1B in bf16).

torch runs a checkpointed layer under ``torch.compile`` through the
``tag_activation_checkpoint`` higher-order op, which reads a policy from its body's
``meta["_checkpoint_context_fn"]`` (torch 2.6 to 2.13, the same key Dynamo writes when a
user passes ``context_fn`` to ``torch.utils.checkpoint``). This module only builds that
policy; the pass that installs it lives in :mod:`tilepass.passes`.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CONTEXT_FN_KEY = "_checkpoint_context_fn"

# The aten ops SDPA dispatches to (their outputs carry everything their backward needs).
# Looked up by name: not every torch has them all.
_ATEN_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)


# Flex attention's outputs are not kept. On the H200 (torch 2.11), a checkpointed Llama
# whose padded attention ran on flex faulted (illegal memory access, then an invalid address
# space error) in the test that compares saving with recomputing; which of the two steps
# faulted is not known yet, so layers on flex keep recomputing until it is.
FLEX_NOT_SAVED = ("attention on flex is recomputed, not kept: a CUDA fault seen with kept flex outputs and "
                  "padding masks (torch 2.11) is not understood yet")


@functools.lru_cache(maxsize=None)
def saved_attention_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in _ATEN_ATTENTION if hasattr(torch.ops.aten, name))


def save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save attention's outputs; recompute everything else (as plain layer checkpointing does)."""
    return CheckpointPolicy.MUST_SAVE if op in saved_attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_context_fn():
    """The ``context_fn`` that puts :func:`save_attention_policy` on a checkpointed layer."""
    fn = functools.partial(create_selective_checkpoint_contexts, save_attention_policy)
    fn.cache_hash = policy_hash()
    return fn


def policy_hash() -> str:
    """AOTAutograd's cache key for graphs under this policy (it bypasses the cache for a
    policy without one): the ops it keeps, so a changed set never reuses a graph that was
    partitioned for another."""
    return "tilepass.save_attention:" + ",".join(sorted(str(op) for op in saved_attention_ops()))


def has_policy(body: torch.fx.GraphModule) -> bool:
    """Does this checkpointed layer already carry a policy (the user's ``context_fn``)?"""
    return CONTEXT_FN_KEY in body.meta


def install(body: torch.fx.GraphModule) -> None:
    body.meta[CONTEXT_FN_KEY] = save_attention_context_fn()
