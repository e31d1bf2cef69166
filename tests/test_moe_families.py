"""MoE router forms beyond the five of test_moe.py, from tiny transformers models: every
block is tiled and exact, or left alone with its reason; none goes unrecorded.

- DeepSeek-V3, GLM-4-MoE: sigmoid scores, a score-correction bias, group-limited top-k
  (groups scored by their top-2, the best groups kept with a scatter_ mask), gather,
  renormalise, routed scaling; shared experts.
- ERNIE 4.5: softmax, score-correction bias, clamped renormalisation; shared experts.
- Granite: ``type_as`` casts in the router. FlexOlmo: a post-norm on the block's output.
- JetMoE: its router calls ``.tolist()`` on the token counts, so its experts are in
  another graph: left alone, with the reason.

batched_mm experts in float64. DeepSeek-V3, GLM-4-MoE and ERNIE compute the router in
float32 whatever the model's dtype (``.type(torch.float32)``, ``.float()``), so with
several tiles their router matmul and its weight gradient (summed per tile) round
differently from eager's at float32's 1e-7: those compare at rtol 1e-5; one tile is the
same computation as eager's, to 1e-10.
"""
import pytest
import torch

from tilepass.tiny_models import tiny_model

from conftest import assert_close_results, rejected, rewritten, train_step

BATCH, SEQ = 2, 37
FLOAT32_ROUTER = {"deepseek_v3", "glm4_moe", "ernie4_5_moe"}


def _model(arch, **overrides):
    model = tiny_model(arch, experts_implementation="batched_mm", **overrides).double()
    torch.manual_seed(4)
    with torch.no_grad():  # a score-correction bias that matters; no all-zero router
        for name, b in model.named_buffers():
            if "bias" in name and b.is_floating_point():
                b.normal_(0, 0.1)
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def _run(arch, layers=None, **options):
    model = _model(arch, **({} if layers is None else dict(num_hidden_layers=layers)))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (BATCH, SEQ), generator=g)
    inputs, weights = dict(input_ids=ids, labels=ids), torch.randn(BATCH, SEQ, 128, generator=g, dtype=torch.float64)
    want = train_step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", loss=False, **options))
    return train_step(model, inputs, weights, call=compiled), want


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe", "ernie4_5_moe", "granitemoe", "flex_olmo"])
def test_block_tiled_and_exact(arch):
    got, want = _run(arch, num_tiles=5)
    tol = 1e-5 if arch in FLOAT32_ROUTER else 1e-10
    assert_close_results(got, want, rtol=tol, atol=tol / 10, what=arch)
    done = rewritten("moe")
    assert len(done) == 2 and all(r.tiles == 5 for r in done), [(r.module, r.reason) for r in rejected("moe")]
    assert not rejected("moe")
    if arch in ("deepseek_v3", "glm4_moe", "ernie4_5_moe"):
        assert all(r.pattern.endswith("_shared") for r in done)


def test_group_limited_router_one_tile_is_eager():
    got, want = _run("deepseek_v3", num_tiles=1)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    assert [r.tiles for r in rewritten("moe")] == [1, 1]


def test_router_that_leaves_the_graph_is_recorded():
    got, want = _run("jetmoe", layers=1, num_tiles=5)  # Dynamo breaks the graph in every block: one is enough
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    assert not rewritten("moe")
    reasons = [r.reason for r in rejected("moe")]
    assert reasons and all(r.startswith("the routed experts are not in this graph") for r in reasons), reasons
