"""What flex attention needs on each torch version and device: the one place that knows.

| torch | mask/compile                                      | training (backward)                       | log-sum-exp API               |
|-------|---------------------------------------------------|-------------------------------------------|-------------------------------|
| ≤2.5  | dynamic=False; pad Q/KV lengths to 128            | default                                   | ``return_lse=True``           |
| 2.6   | default                                           | mode "max-autotune-no-cudagraphs" (pytorch#146260: NoValidChoicesError in flex backward) | ``return_lse=True`` |
| 2.7+  | default                                           | default                                   | ``return_lse=True``           |
| 2.9+  | default                                           | default                                   | ``return_aux=AuxRequest(lse=True)`` |

tilepass routes attention *inside* the graph it hands to inductor, so "compile settings"
are inductor config patches for that graph (there is no separate compiled wrapper that
would recompile when train/eval flips). Device features are probed, not assumed: whether
flex attention can run a backward on a device type is checked once by running one.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch

from . import compat


@dataclasses.dataclass(frozen=True)
class FlexRow:
    since: tuple[int, int]
    dynamic: bool | None  # None: leave torch.compile's default
    pad_to: int | None  # pad query/key lengths to a multiple of this
    training_mode: str | None  # inductor mode needed for the backward
    lse_api: str  # "return_lse" or "return_aux"


FLEX_TABLE: tuple[FlexRow, ...] = (
    FlexRow((2, 5), dynamic=False, pad_to=128, training_mode=None, lse_api="return_lse"),
    FlexRow((2, 6), dynamic=None, pad_to=None, training_mode="max-autotune-no-cudagraphs", lse_api="return_lse"),
    FlexRow((2, 7), dynamic=None, pad_to=None, training_mode=None, lse_api="return_lse"),
    FlexRow((2, 9), dynamic=None, pad_to=None, training_mode=None, lse_api="return_aux"),
)


def flex_row(version: tuple[int, ...] | None = None) -> FlexRow:
    """The table row for ``version`` (default: the installed torch)."""
    version = tuple((version or compat.TORCH_VERSION)[:2])
    rows = [r for r in FLEX_TABLE if version >= r.since]
    if not rows:
        raise RuntimeError(f"flex attention needs torch>=2.5; this is torch {'.'.join(map(str, version))}")
    return rows[-1]


def inductor_patches(training: bool, device_type: str, version: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Inductor config for a graph that contains routed attention."""
    patches: dict[str, Any] = {}
    row = flex_row(version)
    if training and row.training_mode:
        patches.update(torch._inductor.list_mode_options(row.training_mode))
    if device_type == "cpu":
        # The CPU flex template cannot take fused epilogues ("Unsupported for
        # `epilogue_nodes` in CppFlexAttentionTemplate", torch 2.13).
        patches["epilogue_fusion"] = False
    return patches


# The CPU flex template (torch 2.13) computes some rows wrong, at random from call to call
# (identical calls differ), at some lengths below 128: 8, 24, 40, ..., 120 (4 to 22 calls in
# 30 wrong, plain causal masks and padded ones alike), and 40 padded to 48. Every length
# tried that is a multiple of 128 was right in every call, so CPU lengths are padded to one
# (tests/test_attention.py::test_compiled_flex_matches_sdpa_at_every_call).
CPU_LENGTH_MULTIPLE = 128


def length_multiple(device_type: str, version: tuple[int, ...] | None = None) -> int | None:
    """Pad query and key lengths to a multiple of this before flex attention (None: don't):
    torch 2.5 needs it everywhere, the CPU kernel on every version."""
    pad_to = flex_row(version).pad_to
    if device_type == "cpu":
        return pad_to or CPU_LENGTH_MULTIPLE
    return pad_to


def mask_buffers_must_be_realized(device_type: str) -> bool:
    """The CPU flex template finds no kernel when a mask_mod reads a tensor inductor has
    not materialised ("NoValidChoicesError: No choices exist for backend", torch 2.13), e.g.
    ``attention_mask.to(bool)`` computed in the graph; a real buffer works."""
    return device_type == "cpu"


def eager_form_in_checkpoint_supported(device_type: str) -> bool:
    """May eager-form attention (the softmax written out) be routed inside a checkpointed
    layer (a ``tag_activation_checkpoint`` body) on this device? Not on CUDA: measured on
    an H200 with torch 2.11, Gemma 2's eager attention routed there compiled to a kernel
    that faults with an illegal memory access (with or without softcap and padding), while
    SDPA sites in the same place, and the eager form without checkpointing, train
    correctly. On CPU no backward runs through flex attention, so nothing is routed there
    in training anyway."""
    return device_type == "cpu"


def symbolic_lengths_supported() -> bool:
    """May attention with a symbolic (dynamic-shape) query/key length be routed? Not yet:
    on torch 2.13 (CPU) inductor fails on such a graph once the mask reads data ("A subgraph
    argument other than striding has been modified; FakeTensorUpdater cannot update this
    argument"), and under dynamic shapes transformers' masks always read data (positions).
    ``torch.compile(..., dynamic=False)`` keeps routing when lengths vary (one graph each)."""
    return False


def lse_in_compiled_graph(device_type: str) -> bool:
    """Can flex attention return its log-sum-exp inside a compiled graph on this device?
    Not on CPU: "torch.compile on CPU only supports inference and `return_lse` is not
    supported yet" (torch 2.13). A device fact of the CPU template, not a version row."""
    return device_type != "cpu"


def lse_kwargs(version: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Keyword arguments that make ``flex_attention`` also return the log-sum-exp."""
    if flex_row(version).lse_api == "return_aux":
        from torch.nn.attention.flex_attention import AuxRequest

        return {"return_aux": AuxRequest(lse=True)}
    return {"return_lse": True}


def unpack_lse(result: Any, version: tuple[int, ...] | None = None):
    """(out, lse) from what ``flex_attention(..., **lse_kwargs())`` returned."""
    out, extra = result
    return (out, extra.lse) if flex_row(version).lse_api == "return_aux" else (out, extra)


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def flex_backward_supported(device_type: str) -> bool:
    """Can flex attention compute gradients on this device type? Probed by running one
    (torch 2.13 CPU raises "FlexAttention does not support backward on CPU")."""
    if not flex_available():
        return False
    from torch.nn.attention.flex_attention import flex_attention

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            q = torch.zeros(1, 1, 16, 16, device=device_type, requires_grad=True)
            flex_attention(q, q, q).sum().backward()
    except Exception:  # NotImplementedError on CPU; any failure means: do not route training here
        return False
    return True
