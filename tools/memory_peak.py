"""What is alive at a training step's peak? One recorded step per variant, the peak's blocks.

Builds the stacks of ``tools/bench.py`` and runs its variants (so ``+cudnn`` works too). Per
variant: one step to compile and warm up, then one step under
``torch.cuda.memory._record_memory_history``. The trace is replayed to find the moment of
the highest allocation, and the blocks alive then that the step allocated are grouped by
where they were allocated: the innermost Python frame outside torch's own package, i.e.
the line of inductor's generated code (``buf12 = empty_strided_cuda((1, 32, 65536, 64),
...)``), of tilepass or of transformers. What was allocated before the step (weights) is
the baseline; the step's activations, checkpoints and gradients are all its own.

    python tools/memory_peak.py --layers 4 --seq 65536 --variants tilepass,tilepass+flex --top 12

CUDA only; ``peak_live`` (the replay) is plain Python and tested on CPU.
"""
from __future__ import annotations

import argparse
import json
import linecache
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (same models, variants and step as the benchmark)

MIB = 2 ** 20
TORCH_DIR = os.path.dirname(torch.__file__)


def peak_live(events: list[dict]) -> tuple[int, int, list[dict]]:
    """Replay allocator trace events (``action``, ``addr``, ``size``): the highest total of
    bytes allocated during the trace, the event index where it was reached, and the alloc
    events alive then (allocated in the trace, not yet freed)."""
    live: dict[int, dict] = {}
    total = peak = peak_at = 0
    peak_blocks: list[dict] = []
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_at, peak_blocks = total, i, list(live.values())
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, peak_at, peak_blocks


def site(frames: list[dict]) -> str:
    """Where a block was allocated: the innermost frame outside torch's package, with its
    source line (inductor's generated files are still on disk in this process)."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(TORCH_DIR) or name.startswith("<") or name.endswith("/memory_peak.py"):
            continue
        text = linecache.getline(name, f.get("line", 0)).strip()
        return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}: {text[:120]}"
    return "(no frame outside torch)"


def record(model, variant: str, seq: int, args) -> dict:
    import tilepass

    torch._dynamo.reset()
    tilepass.reset()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step = bench.make_step(model, variant, args)
    ids = torch.randint(0, bench.vocab_size(args), (1, seq), device="cuda")
    step(ids)  # compile, autotune, warm the allocator
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(ids)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, at, blocks = peak_live(events)
    groups: dict[str, list[int]] = defaultdict(list)
    for b in blocks:
        groups[site(b.get("frames", []))].append(b["size"])
    top = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[: args.top]
    row = dict(variant=variant, seq=seq, layers=args.layers, base_gib=base / 2**30, step_peak_gib=peak / 2**30,
               max_memory_allocated_gib=torch.cuda.max_memory_allocated() / 2**30, events=len(events), peak_event=at,
               peak_alloc=dict(site=site(events[at].get("frames", [])), mib=events[at]["size"] / MIB) if events else None,
               live_blocks=len(blocks),
               top=[dict(site=s, mib=sum(sizes) / MIB, blocks=len(sizes), sizes_mib=sorted({round(x / MIB, 1) for x in sizes}))
                    for s, sizes in top])
    del step
    bench.undo_variant()  # the tilepass+save-nothing control patches the policy while it runs
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "causal", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--variants", default="tilepass,tilepass+flex")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_peak.py records CUDA's allocator: it needs a GPU")
    args.seqs, args.tiny, args.device, args.dtype, args.lora = [args.seq], False, "cuda", "bfloat16", False
    model = bench.build_model(args)
    rows = []
    for variant in args.variants.split(","):
        row = record(model, variant, args.seq, args)
        rows.append(row)
        print(f"\n{variant}: baseline {row['base_gib']:.2f} GiB, peak {row['step_peak_gib']:.2f} GiB above it "
              f"(max_memory_allocated {row['max_memory_allocated_gib']:.2f}), {row['live_blocks']} blocks alive at "
              f"event {row['peak_event']}/{row['events']}")
        if row["peak_alloc"]:
            print(f"  reached by a {row['peak_alloc']['mib']:.1f} MiB block at {row['peak_alloc']['site']}")
        for t in row["top"]:
            print(f"  {t['mib']:9.1f} MiB  {t['blocks']:3d}× {t['sizes_mib']}  {t['site']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
                               command="python " + " ".join(sys.argv), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
