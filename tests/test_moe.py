"""MoE blocks (router + experts) from tiny transformers models, tiled along tokens vs eager.

batched_mm experts run in float64 (tolerance 1e-10). grouped_mm has no float64 CPU kernel
(eager raises "Expected mat_a to be Float32, BFloat16 or Float16"), so that form runs in
float32 with a stated tolerance: rtol 1e-4, atol 5e-5 (weight gradients are summed per tile
and then over tiles, a different float32 summation order than over the whole sequence).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilepass
from tilepass.tiny_models import MOE_ARCHS, tiny_model

from conftest import LOSS_RTOL, rejected, rewritten

BATCH, SEQ = 2, 37


def _setup(arch, impl, dtype, **overrides):
    model = tiny_model(arch, experts_implementation=impl, **overrides).to(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (BATCH, SEQ), generator=g)
    logit_w = torch.randn(BATCH, SEQ, 128, generator=g, dtype=dtype)
    router_w = torch.randn(BATCH * SEQ, 4, generator=g, dtype=dtype)
    return model, dict(input_ids=ids, labels=ids), (logit_w, router_w)


def _step(model, inputs, weights, call=None):
    """Loss (with the aux load-balancing loss) + weighted logits + weighted router logits of
    every layer: non-uniform gradients reach every output of every MoE block."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(**inputs)
    logit_w, router_w = weights
    loss = out.loss + (out.logits * logit_w).sum()
    for rl in out.router_logits:
        loss = loss + (rl * router_w).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), out.logits.detach(), [r.detach() for r in out.router_logits], out.aux_loss.detach(), grads


def _compare(got, want, rtol, atol):
    for a, b, what in zip(got[:4], want[:4], ("loss", "logits", "router_logits", "aux_loss")):
        r = max(rtol, LOSS_RTOL) if what == "loss" else rtol  # float32 in transformers (conftest)
        torch.testing.assert_close(a, b, rtol=r, atol=atol, msg=lambda m, w=what: f"{w}: {m}")
    assert got[4].keys() == want[4].keys()
    for name in want[4]:
        torch.testing.assert_close(got[4][name], want[4][name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def _run(arch, impl, dtype, rtol, atol, layers=2, **options):
    model, inputs, weights = _setup(arch, impl, dtype, num_hidden_layers=layers)
    want = _step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=options)
    got = _step(model, inputs, weights, call=compiled)
    _compare(got, want, rtol, atol)
    return model


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_batched_mm_float64(arch):
    model = _run(arch, "batched_mm", torch.float64, 1e-10, 1e-10, downstream="aot_eager", num_tiles=5)
    moe = rewritten("moe")
    assert [r.module for r in moe] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(r.pattern.startswith("moe_batched_mm_top2") and r.tiles == 5 for r in moe)
    assert not rejected("moe") and not rejected("mlp")
    assert not rewritten("mlp")  # a shared expert is tiled with its block, not on its own


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_grouped_mm_float32(arch):
    _run(arch, "grouped_mm", torch.float32, 1e-4, 5e-5, downstream="aot_eager", num_tiles=5)
    moe = rewritten("moe")
    assert len(moe) == 2 and all(r.pattern.startswith("moe_grouped_mm_top2") for r in moe)
    shared = arch == "qwen2_moe"
    assert all(r.pattern.endswith("_shared") == shared for r in moe)


@pytest.mark.parametrize("tiles", [dict(num_tiles=1), dict(num_tiles=2), dict(num_tiles=5), dict(tile_tokens=16), {}])
def test_tile_counts_mixtral(tiles):
    """One layer: the count is the point (two-layer models: the tests above)."""
    _run("mixtral", "batched_mm", torch.float64, 1e-10, 1e-10, layers=1, downstream="aot_eager", **tiles)
    moe = rewritten("moe")
    if "num_tiles" in tiles:
        expected = tiles["num_tiles"]
    elif "tile_tokens" in tiles:
        expected = -(-BATCH * SEQ // tiles["tile_tokens"])
    else:  # default: top-2 x gate_up (2 x 176, Mixtral's experts use intermediate_size) vs hidden 64
        expected = tilepass.default_num_tiles(BATCH * SEQ, 64, 2 * 2 * 176)
        assert expected == 11
    assert [r.tiles for r in moe] == [expected]


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])
def test_inductor(arch):
    """One layer: a second block compiles to the same kernels (two-layer models, every MoE
    family: test_batched_mm_float64 and test_grouped_mm_float32 above, on aot_eager)."""
    model, inputs, weights = _setup(arch, "grouped_mm", torch.float32, num_hidden_layers=1)
    want = _step(model, inputs, weights)
    got = _step(model, inputs, weights, call=torch.compile(model, backend="tilepass", options=dict(num_tiles=5)))
    _compare(got, want, 1e-3, 1e-4)  # float32, inductor-fused vs eager kernels
    assert len(rewritten("moe")) == 1


def test_eager_experts_are_left_alone_and_exact():
    """experts_implementation="eager" loops over experts with nonzero(): Dynamo breaks the
    graph in every MoE layer (so does plain torch.compile). The router's graph has no
    experts in it; tilepass records why and changes nothing."""
    _run("mixtral", "eager", torch.float64, 1e-10, 1e-10, layers=1, downstream="aot_eager", num_tiles=5)
    assert not rewritten("moe")
    reasons = {r.reason for r in rejected("moe")}
    assert reasons and all("experts" in r for r in reasons), reasons


# --- a capacity-limited router must not be tiled ---------------------------------------


class CapacityMoE(nn.Module):
    """Switch-style top-1 routing with an expert capacity: a token beyond its expert's
    capacity (counted over the whole sequence, in token order) is dropped. Tiling would
    change which tokens are dropped."""

    def __init__(self, h=16, i=32, experts=4, capacity=6):
        super().__init__()
        self.router = nn.Linear(h, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, i, h) * 0.1)
        self.w_out = nn.Parameter(torch.randn(experts, h, i) * 0.1)
        self.capacity = capacity

    def forward(self, x):
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs = F.softmax(self.router(flat), dim=-1)
        top_p, top_e = torch.topk(probs, 1, dim=-1)
        one_hot = F.one_hot(top_e[:, 0], num_classes=self.w_in.shape[0]).to(x.dtype)
        position = torch.cumsum(one_hot, dim=0) * one_hot  # rank of each token in its expert
        keep = (position.sum(-1) <= self.capacity).to(x.dtype)
        w_in, w_out = self.w_in[top_e[:, 0]], self.w_out[top_e[:, 0]]
        hidden = F.silu(torch.bmm(w_in, flat.unsqueeze(-1)))
        out = torch.bmm(w_out, hidden).squeeze(-1) * (top_p * keep.unsqueeze(-1))
        return out.reshape(b, s, h)


def test_capacity_limited_router_rejected_and_exact():
    torch.manual_seed(0)
    model = CapacityMoE().double()
    x = torch.randn(2, 19, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 19, 16, dtype=torch.float64)
    want = torch.autograd.grad(model(x), [x, *model.parameters()], g)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=4))
    got = torch.autograd.grad(compiled(x), [x, *model.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not rewritten("moe")
    [r] = rejected("moe")
    assert "mixes tokens" in r.reason or "keep tokens apart" in r.reason, r.reason


def test_moe_switch_off():
    _run("mixtral", "batched_mm", torch.float64, 1e-10, 1e-10, downstream="aot_eager", moe=False)
    assert not rewritten("moe") and not rejected("moe")


def test_no_new_graph_breaks():
    """tilepass runs after Dynamo captured the graph, so it sees the graphs plain
    torch.compile sees; the count of compiled graphs is the same."""
    model, inputs, weights = _setup("gpt_oss", "grouped_mm", torch.float32)
    plain, tiled = [], []

    def count(gm, example_inputs):
        plain.append(gm)
        return gm.forward

    def counting_tilepass(gm, example_inputs):
        tiled.append(gm)
        return tilepass.tilepass_backend(gm, example_inputs, options=dict(downstream="eager"))

    _step(model, inputs, weights)  # once eagerly: transformers' one-time warnings break graphs
    _step(model, inputs, weights, call=torch.compile(model, backend=count))
    tilepass.reset()
    _step(model, inputs, weights, call=torch.compile(model, backend=counting_tilepass))
    assert len(tiled) == len(plain)
    assert len(rewritten("moe")) == 2


class GroupedMoE(nn.Module):
    """transformers' grouped_mm dispatch as it runs on CUDA: F.grouped_mm, sentinel masks
    for expert parallelism, and the sorted expert ids cast to int before histc (here cast
    back to float: CPU histc needs floats)."""

    def __init__(self, h=16, i=24, experts=4, k=2, hist_max=None):
        super().__init__()
        self.router = nn.Linear(h, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, h, 2 * i) * 0.2)
        self.down = nn.Parameter(torch.randn(experts, i, h) * 0.2)
        self.k, self.experts = k, experts
        self.hist_max = experts - 1 if hist_max is None else hist_max

    def forward(self, x):
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        weights, ids = torch.topk(F.softmax(self.router(flat), dim=-1), self.k, dim=-1)
        sample_weights, expert_ids = weights.reshape(-1), ids.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        sentinel = (expert_ids_g >= self.experts).unsqueeze(-1)  # expert-parallel sentinels (none here)
        expert_ids_g.clamp_(max=self.experts - 1)
        xg = flat[perm // self.k].masked_fill(sentinel, 0.0)
        counts = torch.histc(expert_ids_g.int().float(), bins=self.experts, min=0, max=self.hist_max)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = F.grouped_mm(xg, self.gate_up, offs=offsets).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.down, offs=offsets) * sample_weights[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0])
        return out[inv].view(b * s, self.k, h).sum(dim=1).reshape(b, s, h)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm is new in this torch")
@pytest.mark.parametrize("hist_max,tiled", [(None, True), (4, False)])
def test_functional_grouped_mm_and_int_cast(hist_max, tiled):
    torch.manual_seed(0)
    model = GroupedMoE(hist_max=hist_max).to(torch.bfloat16)  # grouped_mm's fake kernel wants bf16
    x = torch.randn(2, 21, 16, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 21, 16, dtype=torch.bfloat16)
    want = torch.autograd.grad(model(x), [x, *model.parameters()], g)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=3))
    got = torch.autograd.grad(compiled(x), [x, *model.parameters()], g)
    for a, b in zip(got, want):  # bf16: error relative to each gradient's norm
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    if tiled:
        assert [r.pattern for r in rewritten("moe")] == ["moe_grouped_mm_top2"]
    else:  # histc over [0, 4] for 4 experts: not provably one group per expert, left alone
        [r] = rejected("moe")
        assert "grouped matmul over 4 experts whose groups were counted with histc(4, 0, 4)" in r.reason, r.reason
