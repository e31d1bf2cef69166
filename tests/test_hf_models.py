"""Tiny transformers models (from config) trained through the backend vs eager, float64."""
import pytest
import torch

import tilepass
from tilepass.tiny_models import ARCHS, EXTRA_DENSE_ARCHS, tiny_model

from conftest import assert_close_results, rejected, rewritten, train_step

BATCH, SEQ = 2, 37  # 74 tokens: no tile count used below divides it


def _setup(arch, **overrides):
    model = tiny_model(arch, **overrides).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (BATCH, SEQ), generator=g)
    inputs = dict(input_ids=ids, labels=ids)
    weights = torch.randn(BATCH, SEQ, 128, generator=g, dtype=torch.float64)
    return model, inputs, weights


def _tiled(model, inputs, weights, **options):
    compiled = torch.compile(model, backend="tilepass", options=options)
    return train_step(model, inputs, weights, call=compiled)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mlp_tiled_exactly_aot_eager(arch):
    model, inputs, weights = _setup(arch)
    want = train_step(model, inputs, weights)
    got = _tiled(model, inputs, weights, downstream="aot_eager")
    assert_close_results(got, want, rtol=1e-10, atol=1e-10, what=arch)
    layers = model.config.num_hidden_layers
    done = rewritten()
    assert len({r.module for r in done}) == layers
    assert all(r.tiles == tilepass.default_mlp_tiles(BATCH * SEQ, 64, r_width(model)) for r in done)
    assert not rejected()


@pytest.mark.parametrize("arch", EXTRA_DENSE_ARCHS)
def test_more_dense_families_tiled_exactly_or_recorded(arch):
    """Block forms beyond the six above (tiny_models.EXTRA_DENSE_ARCHS): attention and MLP
    reading one norm's output side by side, a non-gated biased GELU, post-norms, an MLP
    written inline in the decoder layer (OPT: the record names the layer). Every MLP gets one
    record; all are tiled and exact, except BLOOM's, whose GELU in training is a custom
    autograd.Function: left as it was, with that reason, and still exact. (One decoder layer:
    the block's form is the point; two layers of every family above: the six of
    test_every_mlp_tiled_exactly_aot_eager.)"""
    model, inputs, weights = _setup(arch, attn_implementation="eager", num_hidden_layers=1)
    want = train_step(model, inputs, weights)
    got = _tiled(model, inputs, weights, downstream="aot_eager", num_tiles=5, loss=False)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10, what=arch)
    records = [r for r in tilepass.report() if r.kind == "mlp"]
    assert len(records) == len({r.module for r in records}) == model.config.num_hidden_layers, records
    if arch == "bloom":
        assert not rewritten() and all("custom torch.autograd.Function" in r.reason for r in records), records
    else:
        assert not rejected() and all(r.tiles == 5 for r in records), records


def r_width(model):
    cfg = model.config
    inter = getattr(cfg, "intermediate_size", None) or cfg.n_inner
    gated = cfg.model_type != "gpt2"
    return inter * (2 if gated else 1)


@pytest.mark.parametrize("tiles", [dict(num_tiles=1), dict(num_tiles=2), dict(num_tiles=5), dict(tile_tokens=16)])
def test_tile_counts_llama(tiles):
    model, inputs, weights = _setup("llama", num_hidden_layers=1)  # the count is the point
    want = train_step(model, inputs, weights)
    got = _tiled(model, inputs, weights, downstream="aot_eager", **tiles)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    expected = tiles.get("num_tiles") or -(-BATCH * SEQ // tiles["tile_tokens"])
    assert [r.tiles for r in rewritten()] == [expected]


def test_downstream_eager_llama():
    model, inputs, weights = _setup("qwen3")
    want = train_step(model, inputs, weights)
    got = _tiled(model, inputs, weights, downstream="eager", num_tiles=5)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    assert len(rewritten()) == 2


# One family per MLP structure under inductor: SwiGLU (llama; qwen3 and mistral have the
# same MLP graph), GeGLU with tanh GELU (gemma2), fused gate_up + chunk (phi3), Conv1D with
# spelled-out GELU (gpt2). What inductor receives from tilepass is the graph around each
# tiled region's call, whose form follows the MLP's structure, not the family's name; every
# family is exact under aot_eager above.
INDUCTOR_ARCHS = ("llama", "gemma2", "phi3", "gpt2")


@pytest.mark.parametrize("arch", INDUCTOR_ARCHS)
def test_every_mlp_tiled_exactly_inductor(arch):
    """tilepass+inductor vs eager, float64, and on llama vs plain inductor too. Not every op is
    float64 in a float64 transformers model: RoPE's angles and the loss (`logits.float()`) are
    float32, and inductor fuses and reduces those float32 parts differently in the graph around
    the tiled regions (and differently again from eager). On the SIMD-free CPU code the suite
    compiles (conftest.py) that leaves ~5e-8 of a gradient's scale between the two compiled
    runs (4e-6 on an embedding gradient of size 100) and ~4e-7 of it from eager; a wrong tile
    offset or a lost tile is off by orders of magnitude more. Every float64 op of ours is
    exact, which test_every_mlp_tiled_exactly_aot_eager and the hand-written inductor tests
    check at 1e-10. Eager attention: torch 2.11's inductor fails the float64 CPU SDPA backward
    with a mask ("expected scalar type Double but found Float") without tilepass too. One
    layer: a second compiles to the same kernels (two tiled layers under inductor:
    test_layer_checkpointing)."""
    model, inputs, weights = _setup(arch, attn_implementation="eager", num_hidden_layers=1)
    eager = train_step(model, inputs, weights)
    # plain inductor once, on the SwiGLU: how close two compiled graphs of one model come
    plain = train_step(model, inputs, weights, call=torch.compile(model, backend="inductor")) if arch == "llama" else None
    tilepass.reset()
    got = _tiled(model, inputs, weights, num_tiles=5, attention=False)  # routed attention: test_attention.py
    if plain is not None:
        assert_close_results(got, plain, rtol=1e-7, atol=1e-8, atol_of_scale=1e-7, what=f"{arch} vs inductor")
    assert_close_results(got, eager, rtol=1e-4, atol=1e-5, atol_of_scale=1e-6, what=f"{arch} vs eager")
    assert len({r.module for r in rewritten()}) == model.config.num_hidden_layers


@pytest.mark.parametrize("downstream", ["aot_eager", "inductor"])
def test_layer_checkpointing(downstream):
    """With gradient checkpointing each layer is a tag_activation_checkpoint body: its MLP
    is tiled inside the body, and the result is still exact: to 1e-10 under aot_eager, and
    under inductor to the float32 parts' tolerance of test_every_mlp_tiled_exactly_inductor."""
    model, inputs, weights = _setup("llama", attn_implementation="eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    want = train_step(model, inputs, weights)
    # attention=False: routed eager-form attention drops its float32 softmax (test_attention.py)
    got = _tiled(model, inputs, weights, downstream=downstream, num_tiles=5, attention=False)
    if downstream == "aot_eager":
        assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    else:
        assert_close_results(got, want, rtol=1e-4, atol=1e-5, atol_of_scale=1e-6)
    assert sorted(r.module for r in rewritten()) == ["model.layers.0.mlp", "model.layers.1.mlp"]
