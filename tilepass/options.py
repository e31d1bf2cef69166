"""Backend options: one validated, frozen record.

Options reach the backend as ``torch.compile(model, backend="tilepass", options={...})``
or as keywords of :func:`tilepass.backend`. Unknown keys and bad values raise one
:class:`OptionsError` that names the valid choices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from . import compat

DOWNSTREAMS = ("inductor", "aot_eager", "eager")
ATTENTION_KERNELS = ("auto", "flex")
LOSS_KERNELS = ("auto", "compiled", "eager")


class OptionsError(ValueError):
    """A tilepass option is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class Options:
    #: Tiles per region. ``None`` (default): derived from the region's shapes, see
    #: :func:`default_num_tiles`. Mutually exclusive with ``tile_tokens``.
    num_tiles: int | None = None
    #: Tokens per tile (the last tile may be shorter). Mutually exclusive with ``num_tiles``.
    tile_tokens: int | None = None
    #: What compiles the rewritten graph: "inductor", "aot_eager" or "eager".
    downstream: str = "inductor"
    #: Rewrite dense MLPs (SwiGLU, GeGLU, fused gate_up, plain GELU/ReLU/SiLU MLPs).
    mlp: bool = True
    #: Rewrite MoE blocks (router + experts + combine, optional shared expert).
    moe: bool = True
    #: Rewrite the LM head + cross-entropy of a causal-LM loss into one tiled region: the
    #: full-sequence logits, their float32 copy and their gradient never exist.
    loss: bool = True
    #: Where the loss is computed in the graph and gradients flow, return ``None`` for the
    #: logits it reads (``CausalLMOutput.logits``) instead of materialising them
    #: (``[tokens, vocab]`` in the model's dtype). Default: the logits are kept, exactly.
    skip_logits: bool = False
    #: How one tile of the loss region runs. "compiled": its program (LM head, row-wise ops,
    #: cross-entropy) is compiled by inductor, so the log-softmax and its gradient are fused
    #: kernels reading the tile's logits in the model's dtype (no float32 copy in memory);
    #: compiled once per tile shape (twice per region: the last tile may be shorter).
    #: "eager": eager kernels. "auto" (default): compiled on CUDA when ``downstream`` is
    #: inductor and triton is there, eager otherwise.
    loss_kernel: str = "auto"
    #: Route attention (SDPA, or the eager softmax form) to flex attention with a BlockMask
    #: (causal, sliding window, padding, packed documents, softcap, GPT-OSS sinks).
    #: ``None`` (default): on when ``downstream`` is inductor (flex is only fast compiled),
    #: off otherwise. ``True`` with another downstream is an error.
    attention: bool | None = None
    #: Where routed attention runs. "auto" (default): a plain causal mask (or none) goes to
    #: SDPA's fused kernels (``is_causal=True``: flash/cuDNN on GPU, the fastest there are
    #: for it) and every other mask to flex attention; "flex": every routed site to flex.
    attention_kernel: str = "auto"
    #: Run an SDPA site that trains (plain causal or unmasked) as one fused-kernel call per
    #: group of heads: the backward's work memory (cuDNN's and flash's grow with heads x
    #: tokens, about 1 GiB for 32 heads at 64K tokens) shrinks by the group count; heads are
    #: independent, so the result is the same. ``None`` (default): as many groups as keep one
    #: call's queries within :data:`ATTENTION_CALL_QUERY_BYTES` (4 for Llama-3.2-1B at 64K
    #: tokens; 1, no split, at 16K or less); an int: that many groups, which must divide the
    #: key/value heads (a site where it does not is left as it was, with the reason).
    attention_head_groups: int | None = None
    #: In a layer-checkpointed model, keep each layer's attention outputs for the backward
    #: instead of recomputing attention there (selective activation checkpointing): the
    #: attention forward runs once per step instead of twice. Costs the attention output
    #: and its log-sum-exp per token per layer (4.1 KB for Llama-3.2-1B in bf16). Layers
    #: whose checkpoint already has a user policy (``context_fn``) are left alone.
    #: ``True``: every checkpointed layer with attention; an int ``n``: only the last ``n``
    #: of each compiled graph (the layers whose backward runs first, so the fewest kept
    #: outputs are alive at once): a step-time/memory trade between ``False`` and ``True``.
    save_attention: bool | int = False
    #: Sum weight gradients over tiles in float32 for low-precision parameters. Costs one
    #: float32 buffer per weight of the region (2x a bf16 weight) during its backward.
    accumulate_fp32: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any] | "Options" | None = None, **kwargs: Any) -> "Options":
        if isinstance(options, Options):
            merged = dataclasses.asdict(options)
        elif options is None:
            merged = {}
        elif isinstance(options, Mapping):
            merged = dict(options)
        else:
            raise OptionsError(f"tilepass options must be a dict, got {type(options).__name__}")
        merged.update(kwargs)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in merged if k not in valid)
        if unknown:
            raise OptionsError(
                f"unknown tilepass option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid)}"
            )
        opts = cls(**merged)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not isinstance(self.save_attention, bool) and not (isinstance(self.save_attention, int)
                                                               and self.save_attention >= 1):
            raise OptionsError("tilepass option 'save_attention' must be True, False or a positive int "
                               f"(the last n checkpointed layers), got {self.save_attention!r}")
        for name in ("num_tiles", "tile_tokens", "attention_head_groups"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionsError(f"tilepass option {name!r} must be a positive int or None, got {value!r}")
        if self.num_tiles is not None and self.tile_tokens is not None:
            raise OptionsError("set at most one of the tilepass options 'num_tiles' and 'tile_tokens'")
        if self.downstream not in DOWNSTREAMS:
            raise OptionsError(
                f"tilepass option 'downstream' must be one of {', '.join(map(repr, DOWNSTREAMS))}, got {self.downstream!r}"
            )
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise OptionsError(f"tilepass option 'attention_kernel' must be one of "
                               f"{', '.join(map(repr, ATTENTION_KERNELS))}, got {self.attention_kernel!r}")
        if self.loss_kernel not in LOSS_KERNELS:
            raise OptionsError(f"tilepass option 'loss_kernel' must be one of "
                               f"{', '.join(map(repr, LOSS_KERNELS))}, got {self.loss_kernel!r}")
        for name in ("mlp", "moe", "loss", "skip_logits", "attention", "accumulate_fp32"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "attention" and value is None):
                raise OptionsError(f"tilepass option {name!r} must be True or False"
                                   f"{' (or None: auto)' if name == 'attention' else ''}, got {value!r}")
        if self.attention and self.downstream != "inductor":
            raise OptionsError(
                "tilepass option 'attention' routes to flex attention, which is only fast when inductor "
                f"compiles it; use downstream='inductor' (got {self.downstream!r}) or attention=False"
            )

    def compile_loss_tile(self, device_type: str) -> bool:
        """Does the loss region compile its tile program on ``device_type``? (``loss_kernel``)"""
        if self.loss_kernel != "auto":
            return self.loss_kernel == "compiled"
        return self.downstream == "inductor" and device_type == "cuda" and compat.has_triton()

    def enabled(self, switch: str) -> bool:
        """Is the pass behind option ``switch`` on? (``attention=None`` follows ``downstream``.)"""
        if switch == "attention" and self.attention is None:
            return self.downstream == "inductor"
        return bool(getattr(self, switch))


def default_num_tiles(num_tokens: int, in_features: int, intermediate: int) -> int:
    """Tiles so that one tile's intermediate is about the size of the region's input.

    ``ceil(intermediate / in_features)``, e.g. 8 for Llama-3.2-1B's SwiGLU
    (gate + up = 2 x 8192 wide, hidden 2048), at most one tile per token. It depends on
    the graph's shapes alone, so every rank of a distributed job picks the same value
    without communicating.
    """
    k = -(-intermediate // max(1, in_features))
    return max(1, min(k, num_tokens))


def default_mlp_tiles(num_tokens: int, in_features: int, intermediate: int) -> int:
    """Tiles for a dense MLP: twice :func:`default_num_tiles` (16 for Llama-3.2-1B), so one
    tile's intermediate is about half the region's input. A tile's backward holds about six
    times its intermediate (gate, up, activation, their gradients); once the loss is tiled
    and SDPA runs per group of heads, that is what sets a long-sequence step's peak. On the
    H200 at 64K tokens (causal Llama-3.2-1B stack, ``skip_logits``) 16 tiles took the peak
    from 7.19 to 6.78 GiB at the same step time (1.186 s); 32 tiles, 6.58 GiB at 1.194 s.
    MoE blocks keep :func:`default_num_tiles`: their per-tile grouped GEMMs lose speed as
    tiles shrink."""
    return default_num_tiles(num_tokens, in_features, 2 * intermediate)


#: One call of SDPA over a group of heads reads at most this many bytes of queries by default
#: (``attention_head_groups``): its backward's work memory is a few times that.
ATTENTION_CALL_QUERY_BYTES = 64 * 2**20


def default_head_groups(query_bytes: int, kv_heads: int) -> int:
    """The fewest groups (a divisor of ``kv_heads``) that keep one call's queries within
    :data:`ATTENTION_CALL_QUERY_BYTES`, or one group per key/value head."""
    for groups in range(1, kv_heads + 1):
        if kv_heads % groups == 0 and query_bytes <= groups * ATTENTION_CALL_QUERY_BYTES:
            return groups
    return max(1, kv_heads)


#: The float32 logits of one tile of the loss region stay under this many bytes by default.
LOSS_TILE_LOGITS_BYTES = 512 * 2**20


def default_loss_tiles(num_tokens: int, hidden: int, vocab: int) -> int:
    """Tiles for an LM head + loss: ``ceil(vocab / hidden)`` (one tile's logits about as many
    elements as the head's input, as for an MLP), and more where one tile's float32 logits
    would pass :data:`LOSS_TILE_LOGITS_BYTES`: at long sequences the tile count grows with
    the tokens, so the loss never holds more than about 512 MiB of float32 logits (1,046
    tokens for Llama-3's 128,256 vocabulary)."""
    by_width = default_num_tiles(num_tokens, hidden, vocab)
    by_bytes = -(-num_tokens * vocab * 4 // LOSS_TILE_LOGITS_BYTES)
    return max(1, min(max(by_width, by_bytes), num_tokens))
