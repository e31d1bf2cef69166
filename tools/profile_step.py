"""Where a training step's time goes: one profiled step per variant, kernels and host syncs.

Builds the same stacks as ``tools/bench.py`` and runs its variants, then profiles one step
after two warm-up steps with ``torch.profiler`` and prints, per variant:

* the step's wall time and the device time of its kernels;
* the top kernels/ops by self device time;
* the host-side waits (``cudaStreamSynchronize``, device-to-host copies, ``.item()``),
  the usual reason a region that is fast in FLOPs is slow in wall time;
* the tiled ops (``tilepass::tiled_forward`` / ``tiled_backward``): their count and time.

    python tools/profile_step.py --model moe --layers 1 --seq 65536 --variants eager,tilepass
    python tools/profile_step.py --tiny --device cpu --seq 128 --variants eager,tilepass   # smoke test

``--out DIR`` also writes each variant's full table and a Chrome trace there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (same models, variants and step as the benchmark)

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
               "aten::_local_scalar_dense", "aten::nonzero")


def _self_device_us(evt) -> float:
    """Self time on the device (microseconds); on a CPU-only run, self CPU time."""
    names = ("self_device_time_total", "self_cuda_time_total") if torch.cuda.is_available() else ("self_cpu_time_total",)
    for name in names:
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_variant(model, variant: str, args) -> dict:
    import tilepass

    torch._dynamo.reset()
    tilepass.reset()
    if args.ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    step = bench.make_step(model, variant, args)
    ids = torch.randint(0, 32000, (1, args.seq), device=args.device)
    for _ in range(2):
        step(ids)
    bench.sync(args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(ids)
        bench.sync(args.device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = sorted(events, key=_self_device_us, reverse=True)
    # the rows hold both aten ops and the kernels they launch: on a GPU, count kernels only
    on_device = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    device_total = sum(_self_device_us(e) for e in (on_device if torch.cuda.is_available() else events)) / 1e6
    by_name = {e.key: e for e in events}
    summary = dict(variant=variant, wall_s=wall, device_s=device_total,
                   syncs={k: by_name[k].count for k in SYNC_EVENTS if k in by_name},
                   tiled={k: (by_name[k].count, by_name[k].cpu_time_total / 1e6)
                          for k in ("tilepass::tiled_forward", "tilepass::tiled_backward") if k in by_name})
    print(f"\n=== {variant}: wall {wall:.3f} s, {'kernel time' if torch.cuda.is_available() else 'self CPU time'} "
          f"{device_total:.3f} s", flush=True)
    print(f"host waits: {summary['syncs']}")
    print(f"tiled ops (count, host s): {summary['tiled']}")
    for e in kernels[:args.top]:
        print(f"  {_self_device_us(e) / 1e3:10.1f} ms  x{e.count:<6} {e.key[:110]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        with open(os.path.join(args.out, f"profile_{args.model}_{variant}.txt"), "w") as f:
            f.write(events.table(sort_by=sort_by, row_limit=80, max_name_column_width=120))
        with open(os.path.join(args.out, f"summary_{args.model}_{variant}.json"), "w") as f:
            json.dump(summary, f, indent=1)  # wall time, host waits, tiled ops: not in the table's top rows
        if args.trace:
            prof.export_chrome_trace(os.path.join(args.out, f"trace_{args.model}_{variant}.json"))
    del step
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--variants", default="eager,tilepass")
    p.add_argument("--ckpt", choices=["on", "off"], default="on")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny hidden sizes, for a CPU smoke test")
    p.add_argument("--top", type=int, default=25, help="kernels to print per variant")
    p.add_argument("--out", default=None, help="directory for full tables (and traces with --trace)")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per variant")
    args = p.parse_args(argv)
    args.seqs = [args.seq]  # bench.build_model sizes positions from it
    model = bench.build_model(args)
    return [profile_variant(model, v, args) for v in args.variants.split(",")]


if __name__ == "__main__":
    main()
