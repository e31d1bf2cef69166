"""Diagnose the CUDA fault of eager-form attention routed inside checkpointed layers.

    python tools/diag_eager_checkpoint.py            # every case, one subprocess each

On an H200 with torch 2.11, Gemma 2's eager attention routed inside
``tag_activation_checkpoint`` compiled to a kernel that hit an illegal memory access
(while SDPA sites there, and the eager form without checkpointing, train correctly), so
tilepass declines that case (``flex_versions.eager_form_in_checkpoint_supported``). This
script forces the route and narrows the fault down: which model, whether inductor's
pointwise autotuning or MLP tiling is involved, and (``CUDA_LAUNCH_BLOCKING=1``) which kernel faults.
Each case runs in its own process, because a CUDA fault poisons the context.
"""
from __future__ import annotations

import os
import subprocess
import sys

# mode: "default" (MLP tiling on, as in the failing run), "no-mlp" (attention routing only),
# "no-autotune" (inductor's pointwise autotuning off: the fault surfaced while it benchmarked)
CASES = [("gemma2", "default"), ("gemma2", "no-mlp"), ("gemma2", "no-autotune"), ("llama", "default")]


def one(arch: str, mode: str) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tilepass
    from tilepass import flex_versions
    from tilepass.tiny_models import tiny_model

    flex_versions.eager_form_in_checkpoint_supported = lambda device_type: True
    if mode == "no-autotune":
        torch._inductor.config.triton.autotune_pointwise = False
    model = tiny_model(arch, attn_implementation="eager").cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 256), device="cuda")
    want = model(input_ids=ids, labels=ids).loss
    opts = dict(attention=True, mlp=mode != "no-mlp")
    got = torch.compile(model, backend="tilepass", options=opts)(input_ids=ids, labels=ids).loss
    got.backward()
    torch.cuda.synchronize()
    routed = [r.status for r in tilepass.report() if r.kind == "attention"]
    print(f"{arch} {mode}: OK, loss diff {abs(got.item() - want.item()):.2e}, attention {routed}")


def main() -> None:
    if len(sys.argv) == 3:
        return one(*sys.argv[1:])
    for arch, mode in CASES:
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        r = subprocess.run([sys.executable, __file__, arch, mode], capture_output=True, text=True, env=env, timeout=300)
        lines = (r.stdout + r.stderr).splitlines()
        ok = [ln for ln in lines if ": OK" in ln]
        kernels = [ln.strip() for ln in lines if "triton_" in ln and ".run(" in ln][-2:]
        errors = [ln.strip() for ln in lines if "Error" in ln][-1:]
        print(ok[0] if ok else f"{arch} {mode}: FAIL {errors} last kernels {kernels}", flush=True)


if __name__ == "__main__":
    main()
