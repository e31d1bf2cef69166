"""Hand-written MLPs: biases, every activation form, 2-D inputs, and near misses that must
be left alone (with the reason recorded) while the result stays exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilepass

from conftest import rejected, rewritten


class GatedMLP(nn.Module):
    def __init__(self, h=24, i=40, act=F.silu, bias=True):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(h, i, bias), nn.Linear(h, i, bias), nn.Linear(i, h, bias)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class PlainMLP(nn.Module):
    def __init__(self, h=24, i=40, act=F.gelu, bias=True):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(h, i, bias), nn.Linear(i, h, bias), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Two residual MLP blocks with a norm, so gradients flow MLP -> MLP."""

    def __init__(self, mlp_factory):
        super().__init__()
        self.norm1, self.mlp1 = nn.LayerNorm(24), mlp_factory()
        self.norm2, self.mlp2 = nn.LayerNorm(24), mlp_factory()

    def forward(self, x):
        x = x + self.mlp1(self.norm1(x))
        return x + self.mlp2(self.norm2(x))


def _check(model, x, options, rtol=1e-10, atol=1e-10):
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(x.shape, generator=g, dtype=x.dtype)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = model(x_ref)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *model.parameters()], upstream)
    compiled = torch.compile(model, backend="tilepass", options=options)
    x_t = x.detach().clone().requires_grad_()
    y = compiled(x_t)
    grads = torch.autograd.grad(y, [x_t, *model.parameters()], upstream)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return y


ACTS = {
    "silu": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_spelled": lambda t: 0.5 * t * (1.0 + torch.tanh(0.7978845608028654 * (t + 0.044715 * torch.pow(t, 3.0)))),
}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_plain_mlp(act, bias):
    torch.manual_seed(0)
    model = Block(lambda: PlainMLP(act=ACTS[act], bias=bias)).double()
    _check(model, torch.randn(3, 29, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=4))
    done = rewritten()
    assert [r.module for r in done] == ["mlp1", "mlp2"]
    assert all(r.pattern.startswith("mlp_") for r in done)
    assert not rejected()


@pytest.mark.parametrize("act,pattern", [("silu", "swiglu"), ("gelu", "geglu"), ("relu", "reglu")])
def test_gated_mlp_with_bias(act, pattern):
    torch.manual_seed(0)
    model = Block(lambda: GatedMLP(act=ACTS[act])).double()
    _check(model, torch.randn(2, 31, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=5))
    assert [r.pattern for r in rewritten()] == [pattern, pattern]


def test_two_dimensional_input():
    torch.manual_seed(0)
    model = GatedMLP().double()
    _check(model, torch.randn(53, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=3))
    assert [r.tiles for r in rewritten()] == [3]


def test_inductor_hand_mlp_with_bias():
    torch.manual_seed(0)
    model = Block(lambda: GatedMLP()).double()
    _check(model, torch.randn(2, 37, 24, dtype=torch.float64), dict(num_tiles=5))
    assert len(rewritten()) == 2


class FusedGateUp(nn.Module):
    def __init__(self, h=24, i=40):
        super().__init__()
        self.gate_up, self.down = nn.Linear(h, 2 * i), nn.Linear(i, h)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.silu(gate))


class InterleavedGateUp(FusedGateUp):
    def forward(self, x):
        gu = self.gate_up(x)
        gate, up = gu[..., ::2], gu[..., 1::2]
        return self.down((up + 1) * gate * torch.sigmoid(1.702 * gate.clamp(max=7.0)))


@pytest.mark.parametrize("cls", [FusedGateUp, InterleavedGateUp])
def test_fused_gate_up(cls):
    torch.manual_seed(0)
    model = cls().double()
    _check(model, torch.randn(2, 23, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=4))
    assert [r.pattern for r in rewritten()] == ["fused_gate_up_swiglu" if cls is FusedGateUp else "fused_gate_up_sigmoid_glu"]


# --- near misses ----------------------------------------------------------------------


class CumsumMLP(GatedMLP):
    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x).cumsum(dim=1))


class MeanOverSeqMLP(PlainMLP):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h - h.mean(dim=1, keepdim=True))


class DropoutMLP(PlainMLP):
    def forward(self, x):
        return self.fc2(F.dropout(self.act(self.fc1(x)), p=0.1, training=self.training))


class LeakyIntermediate(PlainMLP):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h), h.sum()


@pytest.mark.parametrize(
    "cls,reason",
    [
        (CumsumMLP, "op `cumsum` over dim 1 mixes tokens"),
        (MeanOverSeqMLP, "op `mean` over dim 1 mixes tokens"),
    ],
)
def test_token_mixing_op_rejected_and_exact(cls, reason):
    torch.manual_seed(0)
    model = cls().double()
    _check(model, torch.randn(2, 19, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=4))
    assert not rewritten()
    [r] = rejected()
    assert r.reason == reason and r.module == "" and r.status == "rejected"


class DropoutNoBiasMLP(nn.Module):
    def __init__(self, h=24, i=40, p=0.3):
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(h, i), nn.Linear(i, h, bias=False), p

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), p=self.p, training=self.training))


def test_dropout_one_tile_draws_exactly_the_eager_mask():
    """With one tile the region draws its mask like eager, from the same generator state:
    outputs and every gradient are identical."""
    model = DropoutMLP().double()
    x = torch.randn(2, 19, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 19, 24, dtype=torch.float64)
    torch.manual_seed(123)
    want = torch.autograd.grad(model(x), [x, *model.parameters()], g)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=1))
    torch.manual_seed(123)
    got = torch.autograd.grad(compiled(x), [x, *model.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    [r] = rewritten()
    assert r.tiles == 1 and not rejected()


@pytest.mark.parametrize("downstream", ["aot_eager", "inductor"])
def test_dropout_recompute_replays_the_forward_masks(downstream):
    """y = fc2(m * gelu(fc1(x))) is linear in fc2's weight W, so <dL/dW, W> = <y, dL/dy>
    for the masks the forward drew. A recompute that drew other masks breaks the identity.
    The caller's generator is left where the forward left it."""
    model = DropoutNoBiasMLP().double()
    x = torch.randn(2, 37, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 37, 24, dtype=torch.float64)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream=downstream, num_tiles=5))
    torch.manual_seed(7)
    y = compiled(x)
    after_forward = torch.get_rng_state()
    (dw,) = torch.autograd.grad(y, [model.fc2.weight], g)
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.testing.assert_close((dw * model.fc2.weight).sum(), (y * g).sum(), rtol=1e-12, atol=1e-12)
    [r] = rewritten()
    assert r.tiles == 5 and not rejected()


def test_dropout_eval_is_identity_and_tiled():
    model = DropoutMLP().double().eval()
    _check(model, torch.randn(2, 19, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=3))
    assert len(rewritten()) == 1


def test_intermediate_read_outside_rejected():
    torch.manual_seed(0)
    model = LeakyIntermediate().double()
    x = torch.randn(2, 19, 24, dtype=torch.float64, requires_grad=True)
    y, s = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager"))(x)
    y_ref, s_ref = model(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    [r] = rejected()
    assert "also read outside" in r.reason


def test_mlp_switch_off():
    torch.manual_seed(0)
    model = GatedMLP().double()
    _check(model, torch.randn(2, 19, 24, dtype=torch.float64), dict(downstream="aot_eager", mlp=False))
    assert tilepass.report() == []


def test_autocast_region_replays_autocast():
    """A region traced under torch.autocast runs its tiles under the same autocast."""
    torch.manual_seed(0)
    model = Block(lambda: GatedMLP())

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    x = torch.randn(2, 37, 24)
    up = torch.randn(2, 37, 24)
    ref_x = x.clone().requires_grad_()
    ref = torch.autograd.grad(f(ref_x), [ref_x, *model.parameters()], up)
    t_x = x.clone().requires_grad_()
    got = torch.autograd.grad(
        torch.compile(f, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=4))(t_x),
        [t_x, *model.parameters()], up,
    )
    assert len(rewritten()) == 2
    for a, b in zip(got, ref):
        # bf16 matmuls, summed over tiles instead of over the whole sequence: compare the
        # error relative to each gradient's norm, as a bf16 reference allows.
        assert a.dtype == b.dtype
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("shape", [(1, 24, 24), (1, 40, 24), (24, 24), (40, 24)])
def test_token_count_equal_to_a_weight_dim(shape):
    """tokens == hidden or == intermediate: a weight then has a token tensor's shape, and
    must still be recognised as a weight."""
    torch.manual_seed(0)
    model = GatedMLP().double()
    _check(model, torch.randn(*shape, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=3))
    assert [r.pattern for r in rewritten()] == ["swiglu"]


@pytest.mark.parametrize("downstream", ["aot_eager", "inductor"])
def test_dynamic_token_count(downstream):
    """dynamic=True: the token count is symbolic; split sizes are computed at run time."""
    torch.manual_seed(0)
    model = Block(lambda: GatedMLP()).double()
    compiled = torch.compile(model, backend="tilepass", dynamic=True, options=dict(downstream=downstream, num_tiles=4))
    for seq in (29, 41):
        x = torch.randn(2, seq, 24, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, seq, 24, dtype=torch.float64)
        got = torch.autograd.grad(compiled(x), [x, *model.parameters()], g)
        want = torch.autograd.grad(model(x), [x, *model.parameters()], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert len(rewritten()) == 2  # one graph for both lengths


class NormTwice(nn.Module):
    """``down(act(gate(norm(x))) * up(norm(x)))``: Dynamo keeps both norm calls."""

    def __init__(self, h=24, i=40):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(h), GatedMLP(h, i)

    def forward(self, x):
        m = self.mlp
        return m.down(F.silu(m.gate(self.norm(x))) * m.up(self.norm(x)))


class DifferentNorms(NormTwice):
    def __init__(self, h=24, i=40):
        super().__init__(h, i)
        self.norm2 = nn.LayerNorm(h)

    def forward(self, x):
        m = self.mlp
        return m.down(F.silu(m.gate(self.norm(x))) * m.up(self.norm2(x)))


def test_same_input_computed_twice_is_one_input():
    torch.manual_seed(0)
    _check(NormTwice().double(), torch.randn(2, 23, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=3))
    assert [r.pattern for r in rewritten()] == ["swiglu"]


def test_different_inputs_are_rejected():
    torch.manual_seed(0)
    _check(DifferentNorms().double(), torch.randn(2, 23, 24, dtype=torch.float64), dict(downstream="aot_eager", num_tiles=3))
    [r] = rejected()
    assert r.reason.startswith("the up projections read different inputs")
