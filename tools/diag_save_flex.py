"""Which step faults: keeping flex attention's outputs, or recomputing them? (GPU only)

    python tools/diag_save_flex.py              # both cases, one fresh process each
    python tools/diag_save_flex.py --case save  # one case in this process

On the H200 (torch 2.11) the CUDA test comparing a saving step with a recomputing one, for a
padded, checkpointed tiny Llama whose attention runs on flex, faulted twice (illegal memory
access; invalid address space). tilepass therefore declines ``save_attention`` for layers on
flex (``checkpoint_policy.FLEX_NOT_SAVED``). This runs each step in its own process with
``CUDA_LAUNCH_BLOCKING=1`` so that the fault, if any, names its kernel, and forces flex
outputs to be kept in the "save" case. Prints one verdict line per case.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def run_case(case: str, pad: bool, seq: int) -> None:
    import torch

    import tilepass
    from tilepass import checkpoint_policy
    from tilepass.tiny_models import tiny_model

    if case == "save":  # keep flex's outputs too: the combination tilepass declines
        flex = torch.ops.higher_order.flex_attention
        ops = checkpoint_policy.saved_attention_ops() | {flex}
        checkpoint_policy.saved_attention_ops = lambda: ops
        checkpoint_policy.FLEX_NOT_SAVED = None  # the pass reads it as its reason: now none
    model = tiny_model("llama", attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, seq), device="cuda")
    am = torch.ones_like(ids)
    am[1, :37] = 0
    inputs = dict(input_ids=ids, attention_mask=am if pad else None, labels=ids.masked_fill(am == 0, -100))
    compiled = torch.compile(model, backend="tilepass", options=dict(save_attention=case == "save"))
    for _ in range(2):
        loss = compiled(**inputs).loss
        loss.backward()
        torch.cuda.synchronize()
    kernels = sorted({r.kernel for r in tilepass.report() if r.kind == "attention" and r.status == "rewritten"})
    saved = [r.module for r in tilepass.report() if r.kind == "checkpoint" and r.status == "rewritten"]
    print(f"VERDICT {case}: ran, loss {loss.item():.6f}, attention on {kernels}, outputs kept in {saved}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["recompute", "save"], default=None, help="one case, in this process")
    p.add_argument("--no-pad", action="store_true", help="an unpadded batch (attention then goes to SDPA, not flex)")
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args(argv)
    if args.case:
        run_case(args.case, not args.no_pad, args.seq)
        return
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for case in ("recompute", "save"):
        cmd = [sys.executable, __file__, "--case", case, "--seq", str(args.seq)] + (["--no-pad"] if args.no_pad else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        verdicts = [line for line in proc.stdout.splitlines() if line.startswith("VERDICT")]
        if proc.returncode == 0 and verdicts:
            print(verdicts[-1])
        else:
            errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line][-6:]
            print(f"VERDICT {case}: FAILED (rc {proc.returncode})")
            for line in errors:
                print("   ", line[:200])


if __name__ == "__main__":
    main()
