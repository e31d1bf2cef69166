"""Which flex-attention features work on this torch and device, each checked against the math.

    python tools/flex_probe.py [--device cuda]

Prints one line per feature: compiled forward, backward, the log-sum-exp (and its
gradient, which GPT-OSS sinks need: out * sigmoid(lse - sink)), and gradients of a tensor
captured by a score_mod.
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from tilepass import flex_versions  # noqa: E402


def reference(q, k, v, sink=None):
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = s.softmax(-1)
    return (p[..., : k.shape[2]] @ v), torch.logsumexp(s[..., : k.shape[2]], -1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = args.device
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, device=dev, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, device=dev, requires_grad=True)
    bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 256, 256, device=dev)
    print(f"torch {torch.__version__} on {dev}; table row {flex_versions.flex_row()}")

    def check(name, fn):
        try:
            print(f"{name:<34}{fn()}")
        except Exception as e:  # a feature that fails prints why
            print(f"{name:<34}FAILS {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    def err(a, b):
        return f"ok, max err {(a - b).abs().max().item():.2e}"

    def fwd():
        out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
        return err(out, reference(q, k, v)[0])

    def bwd():
        out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
        g = torch.autograd.grad(out.square().sum(), q)[0]
        ref = torch.autograd.grad(reference(q, k, v)[0].square().sum(), q)[0]
        return err(g, ref)

    def sinks_through_lse():
        def f(q, k, v, sink):
            out, lse = flex_versions.unpack_lse(flex_attention(q, k, v, block_mask=bm, **flex_versions.lse_kwargs()))
            return out * torch.sigmoid(lse - sink.view(1, -1, 1)).unsqueeze(-1)

        out = torch.compile(f)(q, k, v, sink)
        g = torch.autograd.grad(out.square().sum(), (q, sink))
        ref_out = reference(q, k, v, sink)[0]
        ref = torch.autograd.grad(ref_out.square().sum(), (q, sink))
        return f"{err(out, ref_out)}; grad q {err(g[0], ref[0])}; grad sink {err(g[1], ref[1])}"

    def captured_grad():
        bias = torch.randn(2, device=dev, requires_grad=True)

        def score_mod(s, b, h, qi, ki):
            return s + bias[h]

        out = torch.compile(flex_attention)(q, k, v, score_mod=score_mod, block_mask=bm)
        g = torch.autograd.grad(out.square().sum(), bias)[0]
        return f"ok, grad {g.tolist()}"

    check("compiled forward", fwd)
    check("compiled backward", bwd)
    check("sinks via lse (fwd+bwd)", sinks_through_lse)
    check("captured score_mod tensor grad", captured_grad)


if __name__ == "__main__":
    main()
