"""The saving survives AOTAutograd + inductor: what the compiled graph saves for backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` around the compiled forward,
which sees what inductor's compiled autograd function saves (deduplicated by storage;
parameters and the model input excluded).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilepass

from conftest import rewritten

H, I, TOKENS = 64, 512, 2048


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Stack(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(H) for _ in range(layers))
        self.mlps = nn.ModuleList(SwiGLU() for _ in range(layers))

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return x


def saved_for_backward(fn, model, x):
    """(total bytes, list of shapes) of the tensors autograd keeps from ``fn(x)``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, torch.Size] = {}
    sizes: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr() and ptr not in seen:
            seen[ptr] = t.shape
            sizes[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return sum(sizes.values()), list(seen.values())


def test_saved_activations_drop_under_inductor():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(1, TOKENS, H, requires_grad=True)

    plain_bytes, plain_shapes = saved_for_backward(torch.compile(model, backend="inductor"), model, x)
    tilepass.reset()
    tiled = torch.compile(model, backend="tilepass", options={"num_tiles": 8})
    tiled_bytes, tiled_shapes = saved_for_backward(tiled, model, x)

    assert [r.tiles for r in rewritten()] == [8, 8]
    full_intermediate = TOKENS * I * 4
    # Without tilepass inductor keeps [tokens, intermediate] tensors of every MLP...
    assert any(s[-1] == I and s.numel() // I == TOKENS for s in plain_shapes), plain_shapes
    assert plain_bytes >= 2 * 2 * full_intermediate
    # ...with tilepass nothing intermediate-wide is kept: only [tokens, hidden]-sized inputs.
    assert not any(s and s[-1] == I for s in tiled_shapes), tiled_shapes
    assert tiled_bytes <= plain_bytes / 8, (tiled_bytes, plain_bytes)
    print(f"saved for backward: inductor {plain_bytes / 2**20:.1f} MiB, tilepass+inductor {tiled_bytes / 2**20:.1f} MiB")


def test_report_estimates_the_saving():
    torch.manual_seed(0)
    model = Stack(layers=1)
    x = torch.randn(1, TOKENS, H)
    torch.compile(model, backend="tilepass", options={"num_tiles": 4, "downstream": "aot_eager"})(x)
    [r] = rewritten()
    # gate, up, silu, mul: four [tokens, I] float32 tensors; one tile keeps a quarter.
    assert r.intermediate_bytes == 4 * TOKENS * I * 4
    assert r.saved_bytes == r.intermediate_bytes * 3 // 4


def test_moe_routed_intermediate_not_saved_under_inductor():
    """A Qwen3-MoE-shaped block (4 experts, top-2, grouped_mm, float32): without tilepass,
    inductor keeps its routed [tokens*top_k, ...] tensors for backward; with tilepass it
    keeps none of them. (One layer: what the partitioner keeps is per block.)"""
    from tilepass.tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", experts_implementation="grouped_mm", num_hidden_layers=1, moe_intermediate_size=256)
    tokens, top_k = 1024, 2
    ids = torch.randint(3, 128, (1, tokens))

    def measure(fn):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return list(seen.values())

    plain = measure(torch.compile(model, backend="inductor"))
    tilepass.reset()
    tiled = measure(torch.compile(model, backend="tilepass", options={"num_tiles": 8}))
    assert len(rewritten("moe")) == 1
    routed = lambda saved: [s for s, _ in saved if s and s[0] == tokens * top_k]  # noqa: E731
    assert len(routed(plain)) >= 1, plain
    assert routed(tiled) == [], tiled
    plain_bytes, tiled_bytes = sum(b for _, b in plain), sum(b for _, b in tiled)
    assert tiled_bytes < plain_bytes * 0.6, (tiled_bytes, plain_bytes)
    print(f"MoE saved for backward: inductor {plain_bytes / 2**20:.2f} MiB, tilepass+inductor {tiled_bytes / 2**20:.2f} MiB")


def test_routed_attention_saves_no_dense_mask_under_inductor():
    """Layer checkpointing makes transformers build a [B, 1, S, S] mask under compile, and
    plain inductor keeps it for the backward; routed to SDPA's causal kernel, nothing of
    that shape is saved. With save_attention the saved set grows by exactly each layer's
    attention output and log-sum-exp, and nothing else."""
    from tilepass.tiny_models import tiny_model

    seq = 512
    model = tiny_model("llama", attn_implementation="sdpa")  # 2 layers, 4 heads of 16
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, seq))
    saved = {}
    for name, backend in (("inductor", "inductor"), ("tilepass", "tilepass"),
                          ("save", tilepass.backend(save_attention=True))):
        torch._dynamo.reset()
        tilepass.reset()
        fn = torch.compile(lambda i: model(input_ids=i).logits, backend=backend)
        saved[name] = saved_for_backward(fn, model, ids)
    dense = {name: [tuple(s) for s in shapes if tuple(s[-2:]) == (seq, seq)] for name, (_, shapes) in saved.items()}
    assert dense == {"inductor": [(2, 1, seq, seq)], "tilepass": [], "save": []}
    assert saved["tilepass"][0] < saved["inductor"][0] - 2 * seq * seq
    out, lse = (2, 4, seq, 16), (2, 4, seq)
    assert {tuple(s) for s in saved["save"][1]} - {tuple(s) for s in saved["tilepass"][1]} == {out, lse}
    per_layer = (2 * 4 * seq * 16 + 2 * 4 * seq) * 4  # float32
    extra = saved["save"][0] - saved["tilepass"][0]
    # two layers' worth, give or take the recompute's bookkeeping (an RNG state per layer goes)
    assert abs(extra - 2 * per_layer) <= 16 * 1024, extra
