"""Tiny transformers models built from config (never from a hub): for tests, examples and
``tilepass dump --arch``. Each family keeps its real structure (SwiGLU, GeGLU, fused
gate_up, Conv1D + tanh GELU...) at a size that trains in seconds on a CPU."""
from __future__ import annotations

from typing import Any

ARCHS = ("llama", "qwen3", "gemma2", "phi3", "gpt2", "mistral")
MOE_ARCHS = ("gpt_oss", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
# More MoE router forms (tests/test_moe_families.py): sigmoid scores with group-limited top-k,
# a score-correction bias and routed scaling (DeepSeek-V3, GLM-4-MoE), softmax with a
# score-correction bias and clamped renormalisation (ERNIE 4.5), ``type_as`` casts (Granite),
# a post-norm on the block's output (FlexOlmo), and a router that leaves the graph (JetMoE).
EXTRA_MOE_ARCHS = ("deepseek_v3", "glm4_moe", "ernie4_5_moe", "granitemoe", "flex_olmo", "jetmoe")
# More dense block forms (tests/test_hf_models.py): attention and MLP side by side on one
# norm's output (GPT-J, Falcon, Cohere, GPT-NeoX, Phi-1), a non-gated GELU MLP with biases
# (StarCoder2), norms after the sublayers (OLMo 2), an MLP written inline in the decoder
# layer (OPT), and a GELU that is a custom autograd.Function in training (BLOOM).
EXTRA_DENSE_ARCHS = ("gptj", "falcon", "cohere", "gpt_neox", "phi", "starcoder2", "olmo2", "opt", "bloom")
_GROUPED = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=0, moe_intermediate_size=48, norm_topk_prob=True, routed_scaling_factor=2.5)
_EXTRA = {
    "deepseek_v3": dict(_GROUPED, head_dim=8, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    "glm4_moe": dict(_GROUPED, partial_rotary_factor=0.5),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=48, moe_num_shared_experts=1,
                         moe_layer_start_index=0, moe_layer_interval=1),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gptj": dict(n_inner=176, rotary_dim=8),
    "falcon": dict(parallel_attn=True, new_decoder_architecture=False, multi_query=True),
    "gpt_neox": dict(rotary_pct=0.25),
    "phi": dict(partial_rotary_factor=0.5),
    "opt": dict(ffn_dim=176, word_embed_proj_dim=64, dropout=0.0),
}

_COMMON = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def tiny_config(arch: str, **overrides: Any):
    """A small config of family ``arch`` (one of :data:`ARCHS`, :data:`MOE_ARCHS`,
    :data:`EXTRA_MOE_ARCHS` or :data:`EXTRA_DENSE_ARCHS`)."""
    import transformers

    known = ARCHS + MOE_ARCHS + EXTRA_MOE_ARCHS + EXTRA_DENSE_ARCHS
    if arch not in known:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(known)}")
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=128, n_positions=256,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        kw.update(overrides)
        return transformers.GPT2Config(**kw)
    kw = dict(_COMMON)
    if arch == "gemma2":
        kw.update(sliding_window=64, query_pre_attn_scalar=16)
    if arch == "mistral":
        kw.update(sliding_window=8)  # shorter than the test sequences, so the window matters
    if arch in MOE_ARCHS:
        # 4 experts, top-2, every layer sparse; the aux loss reads the router logits.
        kw.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, experts_per_token=2,
                  moe_intermediate_size=48, shared_expert_intermediate_size=96,
                  output_router_logits=True, router_aux_loss_coef=0.5)
    if arch in EXTRA_MOE_ARCHS:
        kw.update(_EXTRA[arch], output_router_logits=True, router_aux_loss_coef=0.5)
    if arch in EXTRA_DENSE_ARCHS:
        kw.update(_EXTRA.get(arch, {}))
        if arch == "falcon":
            kw.pop("head_dim")  # a read-only property there (hidden / heads)
    kw.update(overrides)
    return transformers.AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str, seed: int = 0, experts_implementation: str | None = None, **overrides: Any):
    """A randomly initialised causal LM of family ``arch`` (float32, train mode).

    ``experts_implementation`` (MoE only): transformers' "grouped_mm" (default), "batched_mm"
    or "eager".
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), **extra)
    return model.train()
