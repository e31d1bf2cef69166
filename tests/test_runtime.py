"""The tiled ops on their own: split sizes, gradients, masks, accumulation, autocast."""
import pytest
import torch
import torch.nn.functional as F

from tilepass import runtime


@pytest.mark.parametrize("n,k", [(74, 5), (6, 4), (10, 10), (3, 8), (1, 1), (128, 3)])
def test_num_tiles_gives_exactly_k_balanced_tiles(n, k):
    sizes = runtime.tile_sizes(n, num_tiles=k)
    assert sum(sizes) == n and len(sizes) == min(n, k)
    assert max(sizes) - min(sizes) <= 1
    # torch.chunk may return fewer chunks than asked: 6 rows in 4 chunks gives 3.
    if (n, k) == (6, 4):
        assert len(torch.arange(6).chunk(4)) == 3 and len(sizes) == 4


@pytest.mark.parametrize("n,t,expected", [(74, 16, [16, 16, 16, 16, 10]), (32, 16, [16, 16]), (5, 16, [5])])
def test_tile_tokens_gives_short_last_tile(n, t, expected):
    assert runtime.tile_sizes(n, tile_tokens=t) == expected


def test_zero_tokens():
    assert runtime.tile_sizes(0, num_tiles=3) == []


def _swiglu(x, wg, wu, wd):
    return (F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),)


def _register(key="test_swiglu", h=8, dtype=torch.float64, **kw):
    runtime.register_region(key, runtime.RegisteredRegion(_swiglu, (runtime.OutputSpec((h,), dtype),), **kw))
    return key


def _weights(h=8, i=20, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(i, h, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(i, h, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(h, i, generator=g, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("tiles", [dict(num_tiles=1, tile_tokens=0), dict(num_tiles=4, tile_tokens=0),
                                   dict(num_tiles=0, tile_tokens=7)])
def test_op_matches_autograd_float64(tiles):
    key = _register()
    ws = _weights()
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(37, 8, dtype=torch.float64)
    (y,) = runtime.tiled_forward(key, x, ws, tiles["num_tiles"], tiles["tile_tokens"])
    got = torch.autograd.grad(y, [x, *ws], g)
    (y_ref,) = _swiglu(x, *ws)
    want = torch.autograd.grad(y_ref, [x, *ws], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_backward_writes_no_grad_and_fires_one_accumulation_per_param():
    key = _register()
    ws = _weights()
    calls = {id(w): 0 for w in ws}
    for w in ws:
        w.register_post_accumulate_grad_hook(lambda p: calls.__setitem__(id(p), calls[id(p)] + 1))
    x = torch.randn(41, 8, dtype=torch.float64, requires_grad=True)
    (y,) = runtime.tiled_forward(key, x, ws, 5, 0)
    y.pow(2).sum().backward()
    # One AccumulateGrad per parameter, however many tiles: what DDP's ready hooks need.
    assert list(calls.values()) == [1, 1, 1]
    ws2 = [w.detach().clone().requires_grad_() for w in ws]
    x2 = x.detach().clone().requires_grad_()
    _swiglu(x2, *ws2)[0].pow(2).sum().backward()
    for w, w2 in zip(ws, ws2):
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-10)


def test_frozen_params_get_no_gradient_work():
    key = _register()
    ws = _weights()
    ws[0].requires_grad_(False)
    x = torch.randn(20, 8, dtype=torch.float64)  # no input grad either
    (y,) = runtime.tiled_forward(key, x, ws, 3, 0)
    (gu, gd) = torch.autograd.grad(y.sum(), [ws[1], ws[2]])
    assert gu.shape == ws[1].shape and gd.shape == ws[2].shape
    grads = runtime.tiled_backward(key, x, ws, [torch.ones(20, 8, dtype=torch.float64)], 3, 0, [False, False, True, True])
    assert grads[0].numel() == 0 and grads[1].numel() == 0


def test_accumulate_fp32_sums_in_float32():
    seen = []
    real_add = torch.Tensor.add_

    key = _register("acc32", dtype=torch.bfloat16, accumulate_fp32=True)
    ws = [w.detach().to(torch.bfloat16).requires_grad_() for w in _weights()]
    x = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    (y,) = runtime.tiled_forward(key, x, ws, 8, 0)
    g = torch.randn(64, 8, dtype=torch.bfloat16)

    def spy(self, other, *a, **k):
        seen.append(self.dtype)
        return real_add(self, other, *a, **k)

    torch.Tensor.add_ = spy
    try:
        grads = torch.autograd.grad(y, [x, *ws], g)
    finally:
        torch.Tensor.add_ = real_add
    assert seen and set(seen) == {torch.float32}
    assert all(gr.dtype == torch.bfloat16 for gr in grads)
    ref = torch.autograd.grad(_swiglu(x.float(), *[w.float() for w in ws])[0], [x], g.float())[0]
    assert ((grads[0].float() - ref).norm() / ref.norm()) < 2e-2


def test_autocast_is_replayed_in_forward_and_backward():
    dtypes = []

    def fn(x, w):
        y = F.linear(x, w)
        dtypes.append(y.dtype)
        return (y,)

    runtime.register_region("ac", runtime.RegisteredRegion(fn, (runtime.OutputSpec((4,), torch.bfloat16),),
                                                            autocast=("cpu", torch.bfloat16)))
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(10, 8, requires_grad=True)
    (y,) = runtime.tiled_forward("ac", x, [w], 2, 0)
    y.float().sum().backward()
    assert dtypes == [torch.bfloat16] * 4  # 2 tiles forward, 2 tiles recomputed
    assert w.grad.dtype == torch.float32


def test_unregistered_key_says_what_to_do():
    with pytest.raises(RuntimeError, match="tilepass.reset"):
        runtime.tiled_forward("nope", torch.randn(3, 2), [], 1, 0)


def test_gradient_that_is_a_view_of_the_incoming_grad_is_not_mutated():
    """For ``y = x + b`` autograd's db per tile can be the incoming gradient itself;
    accumulating into it in place would corrupt the caller's gradient."""
    runtime.register_region("addb", runtime.RegisteredRegion(lambda x, b: (x + b,), (runtime.OutputSpec((3,), torch.float64),)))
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, dtype=torch.float64)
    g = torch.randn(1, 3, dtype=torch.float64)
    g_copy = g.clone()
    grads = runtime.tiled_backward("addb", x, [b], [g], 1, 0, [False, True])
    torch.testing.assert_close(g, g_copy, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], g[0], rtol=0, atol=0)
