"""Where does attention's memory go at long sequence? One causal attention, forward and
backward, on each kernel a routed site can run on.

    python tools/diag_attention_memory.py --seq 65536 [--heads 32 --kv-heads 8 --head-dim 64]

For each kernel (SDPA's flash, cuDNN and memory-efficient backends, forced one at a time, and
compiled flex attention) it prints the memory the call holds beyond its inputs: after the
forward (what the backward keeps: the output, the log-sum-exp) and at the peak of forward +
backward, not counting dq, dk, dv, which every kernel returns (what is left: the output,
the backward's work buffers, expanded GQA heads, float32 accumulators). A kernel that cannot run this call
prints why. Shapes are the Llama-3.2-1B layer of tools/bench.py: bf16, batch 1, GQA.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MIB = 2 ** 20


def measure(attend, q, k, v, grad):
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attend(q, k, v)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    out.backward(grad)
    torch.cuda.synchronize()
    # every kernel ends holding dq, dk, dv: counted apart, the peak is the kernel's own
    input_grads = sum(t.numel() * t.element_size() for t in (q, k, v))
    peak = torch.cuda.max_memory_allocated() - base - input_grads
    del out
    return kept / MIB, peak / MIB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s, d = args.seq, args.head_dim
    q = torch.randn(1, args.heads, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, args.kv_heads, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn(1, args.heads, s, d, device="cuda", dtype=torch.bfloat16)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s, device="cuda")
    flex = torch.compile(flex_attention)

    def sdpa(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return attend

    kernels = {"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
               "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
               "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)}
    io = (q.numel() + 2 * k.numel()) * 2 / MIB
    print(f"seq {s}, q/k/v {io:.0f} MiB, output {q.numel() * 2 / MIB:.0f} MiB; beyond the inputs:")
    print(f"{'kernel':<16}{'kept MiB':>10}{'peak MiB':>10}")
    rows = []
    for name, attend in kernels.items():
        try:
            measure(attend, q, k, v, grad)  # warm-up: compile, autotune, workspace
            kept, peak = measure(attend, q, k, v, grad)
            rows.append(dict(kernel=name, kept_mib=kept, peak_mib=peak))
            print(f"{name:<16}{kept:>10.0f}{peak:>10.0f}")
        except Exception as e:  # a backend that cannot take this call says why
            rows.append(dict(kernel=name, error=str(e).splitlines()[0][:200]))
            print(f"{name:<16}  cannot run: {rows[-1]['error']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(), seq=s, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
