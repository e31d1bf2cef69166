"""PEFT LoRA on the MLP projections: every MLP is tiled as one region, adapters included,
exactly as eager PEFT in float64 (loss, logits, every trainable gradient); the frozen base
gets no gradient computed or returned; records name modules as named_modules() does."""
import pytest
import torch

import tilepass
from tilepass import runtime
from tilepass.tiny_models import tiny_model

from conftest import assert_close_results, rejected, rewritten, train_step

peft = pytest.importorskip("peft")

BATCH, SEQ = 2, 37  # 74 tokens: no tile count used below divides it
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_ONLY = ["gate_proj", "up_proj", "down_proj"]


def _peft_model(arch, targets, dropout=0.0, layers=1, **overrides):
    """One decoder layer unless asked: a second LoRA'd layer is tiled the same way (two:
    test_with_the_loss_region_too, test_frozen_base_gets_no_gradient_computed_or_returned,
    the MoE tests below)."""
    model = tiny_model(arch, num_hidden_layers=layers, **overrides).double()
    torch.manual_seed(5)
    # init_lora_weights=False: lora_B is random too, so every adapter changes the output
    # and both A and B get non-trivial gradients.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                             init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    return peft.get_peft_model(model, config).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (BATCH, SEQ), generator=g)
    return dict(input_ids=ids, labels=ids), torch.randn(BATCH, SEQ, 128, generator=g, dtype=torch.float64)


def _mlp_modules(model):
    return [name for name, _ in model.named_modules() if name.endswith(".mlp")]


def _check_tiled(model, downstream="aot_eager", **options):
    # loss=False: the MLPs are the point here; the tiled loss sums transformers' float32
    # loss in float64 (test_loss.py), which would move the loss value by float32 ulps.
    inputs, weights = _inputs()
    want = train_step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream=downstream, loss=False, **options))
    got = train_step(model, inputs, weights, call=compiled)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    done = rewritten()
    names = _mlp_modules(model)
    assert [r.module for r in done] == names, [(r.module, r.reason) for r in tilepass.report()]
    assert all(r.tiles >= 2 for r in done)
    assert not rejected()
    return got


@pytest.mark.parametrize("arch,targets", [
    ("llama", ALL_LINEAR),
    ("qwen3", MLP_ONLY),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
])
def test_lora_mlps_tiled_exactly(arch, targets):
    model = _peft_model(arch, targets)
    _, _, grads = _check_tiled(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and all("lora_" in n for n in trainable)


def test_with_the_loss_region_too():
    """The defaults (the loss pass on): the LM head + loss is tiled next to the LoRA'd MLPs;
    transformers' float32 loss value to float32 rounding (as in test_loss.py), logits and
    every adapter gradient to 1e-10."""
    model = _peft_model("llama", ALL_LINEAR, layers=2)
    inputs, weights = _inputs()
    want = train_step(model, inputs, weights)
    got = train_step(model, inputs, weights, call=torch.compile(model, backend="tilepass",
                                                                 options=dict(downstream="aot_eager")))
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0.0)
    assert_close_results((want[0], *got[1:]), want, rtol=1e-10, atol=1e-10)
    assert len(rewritten()) == 2 and len(rewritten("loss")) == 1 and not rejected()


def test_lora_on_the_down_projection_only():
    _check_tiled(_peft_model("llama", ["down_proj"]), num_tiles=3)


def test_lora_with_bias_and_a_trained_base():
    """Adapters with a trainable base (modules_to_save-like: every weight trains)."""
    model = _peft_model("llama", MLP_ONLY)
    for p in model.parameters():
        p.requires_grad_(True)
    _check_tiled(model, tile_tokens=16)


def test_frozen_base_gets_no_gradient_computed_or_returned(monkeypatch):
    """Only the adapters train: the tiled backward is told so, and returns nothing (an
    empty tensor, None to autograd) for a frozen weight."""
    model = _peft_model("llama", MLP_ONLY, layers=2)
    seen = []
    inner = runtime.run_tiled_backward

    def spy(key, x, params, grads, num_tiles, tile_tokens, needs_grad, rng=None):
        out = inner(key, x, params, grads, num_tiles, tile_tokens, needs_grad, rng)
        seen.append((list(needs_grad[1:]), [p.shape for p in params], [o.numel() for o in out[1:]]))
        return out

    monkeypatch.setattr(runtime, "run_tiled_backward", spy)
    _check_tiled(model, num_tiles=4)
    assert len(seen) == 2  # one backward per layer's region
    for needs, shapes, returned in seen:
        lora = [s for s, need in zip(shapes, needs) if need]
        assert len(lora) == 6 and all(4 in s for s in lora)  # A and B of gate, up and down (r=4)
        assert len(needs) - len(lora) == 3  # the three frozen base weights
        assert all(n == 0 for n, need in zip(returned, needs) if not need)


def test_inductor_downstream():
    """One layer: a second compiles to the same kernels (two LoRA'd layers: the tests above)."""
    model = _peft_model("qwen3", MLP_ONLY)
    inputs, weights = _inputs()
    plain = train_step(model, inputs, weights, call=torch.compile(model, backend="inductor"))
    tilepass.reset()
    compiled = torch.compile(model, backend="tilepass", options=dict(num_tiles=5, attention=False, loss=False))
    got = train_step(model, inputs, weights, call=compiled)
    assert_close_results(got, plain, rtol=1e-7, atol=1e-8)  # RoPE in float32: see test_hf_models
    assert len(rewritten()) == 1


@pytest.mark.parametrize("kind", ["mlp", "moe"])
def test_lora_dropout_one_tile_draws_exactly_the_eager_masks(kind):
    """lora_dropout=0.1: with one tile the region draws its masks like eager PEFT, from
    the same generator state (the ops in the graph's order), so loss and every gradient are
    eager's. mlp: Llama, adapters on every linear layer; moe: Qwen2-MoE, adapters on the
    shared expert and its gate, whose dropouts are part of the MoE block's region."""
    model = _peft_model("llama", ALL_LINEAR, dropout=0.1) if kind == "mlp" else _peft_moe(dropout=0.1)
    inputs, weights = _inputs()
    torch.manual_seed(123)
    want = train_step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=1, loss=False))
    torch.manual_seed(123)
    got = train_step(model, inputs, weights, call=compiled)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    layers = model.base_model.model.config.num_hidden_layers
    assert [r.tiles for r in rewritten(kind)] == [1] * layers and not rejected(kind)


def test_lora_dropout_recompute_replays_the_forward_masks():
    """With 5 tiles the masks are drawn tile by tile (not eager's), so the check is an
    identity of the function the forward computed: a LoRA'd MLP without biases,
    y = W_d m + s B_d A_d drop(m) (m = act(gate(x)) * up(x), adapters with dropout on gate
    and up too), is linear in (W_d, B_d) jointly, so <dL/dW_d, W_d> + <dL/dB_d, B_d> =
    <dL/dy, y> exactly, for the masks the forward drew. A recompute with other masks (in
    gate, up or down) breaks it. The caller's generator is left where the forward left it."""
    model = _peft_model("llama", MLP_ONLY, dropout=0.1)
    mlp = model.base_model.model.model.layers[0].mlp
    _assert_masks_replayed(mlp, mlp.down_proj, "mlp")


def _assert_masks_replayed(block, down, kind):
    """<dL/dW_d, W_d> + <dL/dB_d, B_d> = <dL/dy, y> for ``block`` compiled with 5 tiles,
    where ``down`` is a LoRA'd projection in which the block's output is linear."""
    w_down, b_down = down.base_layer.weight, down.lora_B["default"].weight
    w_down.requires_grad_(True)
    x = torch.randn(BATCH, SEQ, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(BATCH, SEQ, 64, dtype=torch.float64)
    compiled = torch.compile(block, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=5))
    torch.manual_seed(7)
    y = compiled(x)
    after_forward = torch.get_rng_state()
    dw, db = torch.autograd.grad(y, [w_down, b_down], g)
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.testing.assert_close((dw * w_down).sum() + (db * b_down).sum(), (y * g).sum(), rtol=1e-12, atol=1e-12)
    [r] = rewritten(kind)
    assert r.tiles == 5 and not rejected(kind)


def test_lora_on_a_moe_shared_expert_and_its_gate():
    """Qwen2-MoE with LoRA on the shared expert's projections and on its sigmoid gate: the
    adapters are part of the MoE block's region (one per layer), exact in float64."""
    from tilepass.tiny_models import tiny_model as build

    model = build("qwen2_moe", experts_implementation="batched_mm").double()
    torch.manual_seed(5)
    targets = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False)).double()
    inputs, weights = _inputs()
    want = train_step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=5, loss=False))
    got = train_step(model, inputs, weights, call=compiled)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    moe = rewritten("moe")
    assert [r.module for r in moe] == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
    assert not rejected("moe") and not rewritten() and not rejected()


SHARED_EXPERT = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]


def _peft_moe(dropout):
    from tilepass.tiny_models import tiny_model as build

    model = build("qwen2_moe", experts_implementation="batched_mm").double()
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=SHARED_EXPERT, lora_dropout=dropout,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config).double()


def test_lora_dropout_in_a_moe_block_recompute_replays_the_forward_masks():
    """With 5 tiles, the identity of test_lora_dropout_recompute_replays_the_forward_masks:
    with the routed experts' down projections zeroed, the block is
    y = sigmoid(gate(x)) * (W_d m + s B_d A_d drop(m)), linear in (W_d, B_d) jointly, so
    <dL/dW_d, W_d> + <dL/dB_d, B_d> = <dL/dy, y> for the masks the forward drew (in the
    shared expert's gate, up and down adapters and in its sigmoid gate's). A recompute
    with other masks breaks it. The caller's generator is left where the forward left it."""
    model = _peft_moe(dropout=0.1)
    block = model.base_model.model.model.layers[0].mlp
    with torch.no_grad():
        block.experts.down_proj.zero_()
    _assert_masks_replayed(block, block.shared_expert.down_proj, "moe")


def test_lora_on_moe_expert_weights_is_left_alone_with_the_reason():
    """PEFT's LoRA on fused expert weights (target_parameters) goes through
    torch.nn.utils.parametrize, whose in-place ``set_`` Dynamo cannot trace (so plain
    torch.compile breaks there too): the experts leave the router's graph. Nothing is
    tiled, the result is eager's, and each MoE block's record names the cause."""
    from tilepass.tiny_models import tiny_model as build

    model = build("qwen3_moe", experts_implementation="batched_mm", num_hidden_layers=1).double()  # graph breaks in each block
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, config).double()
    inputs, weights = _inputs()
    want = train_step(model, inputs, weights)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=5, loss=False))
    got = train_step(model, inputs, weights, call=compiled)
    assert_close_results(got, want, rtol=1e-10, atol=1e-10)
    assert sum("lora_" in n for n in got[2]) == 4  # A and B of two expert weights
    assert not rewritten("moe")
    reasons = [r.reason for r in rejected("moe")]
    assert len(reasons) == 1 and all("target_parameters" in r for r in reasons), reasons


def test_dora_mlps_tiled_exactly_in_one_graph():
    """DoRA (use_dora=True) is row-wise: its magnitude scale is computed from weights alone
    ([1, F] per output feature), so the engine takes it in like any LoRA branch, with no
    special case. As shipped, PEFT's ``dequantize_module_weight`` breaks the Dynamo graph
    inside every DoRA layer (``str.startswith`` on a type's module name); tilepass gives
    Dynamo a traceable version for plain weights (compat.trace_peft_plain_weights, hooked
    on PEFT's import, which here comes after tilepass's), so the graph is one and every MLP
    is tiled, exact in float64 (the magnitude vectors' gradients included)."""
    model = tiny_model("llama").double()
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLP_ONLY, use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(model, config).double()
    _, _, grads = _check_tiled(model, num_tiles=3)
    assert sum("lora_magnitude_vector" in n for n in grads) == 6
    assert len({r.graph for r in tilepass.report()}) == 1
