"""Longest sequence that fits on one GPU, per variant: fit peak memory, then prove it.

    python tools/max_seq.py --layers 16 --variants eager,liger,tilepass --probe 16384 32768 65536 \
        --out docs/results/max_seq_h200.json

For each variant, one training step (bench.py's step, layer checkpointing) at each
``--probe`` length gives the peak memory; a least-squares fit (quadratic when three or more
probes, linear with two) predicts the longest length whose peak stays under ``--fraction``
of the GPU's memory, rounded down to ``--multiple``; one real step at that length validates
it (and on OOM the prediction is cut by 10 % and tried once more). Predictions above
``--cap`` are validated at the cap and reported as a lower bound, so that one device call
stays within its time; the validation row holds the fitted peak beside the measured one,
which checks the extrapolation far beyond the probes. A validation is a single step (its
time includes any compilation).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402


def fit_peak(seqs: list[int], peaks: list[float]) -> list[float]:
    """Polynomial coefficients (highest power first) of peak(seq): degree 2 with 3+ points."""
    degree = 2 if len(seqs) >= 3 else 1
    n = degree + 1
    # normal equations, small and exact enough for three to five points
    xs = [[s ** (degree - j) for j in range(n)] for s in seqs]
    ata = [[sum(r[i] * r[j] for r in xs) for j in range(n)] for i in range(n)]
    aty = [sum(r[i] * p for r, p in zip(xs, peaks)) for i in range(n)]
    for i in range(n):  # Gauss-Jordan
        pivot = ata[i][i]
        ata[i] = [v / pivot for v in ata[i]]
        aty[i] /= pivot
        for k in range(n):
            if k != i:
                f = ata[k][i]
                ata[k] = [a - f * b for a, b in zip(ata[k], ata[i])]
                aty[k] -= f * aty[i]
    return aty


def predict_max(coeffs: list[float], budget: float, multiple: int) -> int:
    """The largest seq (a multiple of ``multiple``) with fitted peak <= budget."""
    if len(coeffs) == 2:
        b, a = coeffs
        s = (budget - a) / b if b > 0 else math.inf
    else:
        c2, c1, c0 = coeffs
        if abs(c2) < 1e-18:
            s = (budget - c0) / c1 if c1 > 0 else math.inf
        else:
            disc = c1 * c1 - 4 * c2 * (c0 - budget)
            s = (-c1 + math.sqrt(max(disc, 0.0))) / (2 * c2)
    if not math.isfinite(s):
        raise ValueError("peak memory does not grow with the sequence: cannot extrapolate")
    return max(multiple, int(s // multiple) * multiple)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--variants", default="eager,liger,tilepass")
    p.add_argument("--probe", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--fraction", type=float, default=0.95, help="of the GPU's total memory")
    p.add_argument("--multiple", type=int, default=4096)
    p.add_argument("--cap", type=int, default=262144,
                   help="longest length to validate: a step there must fit the device call (attention is quadratic "
                        "in time); a prediction above it is reported as max_seq_at_least=cap")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("max_seq.py measures GPU memory: it needs CUDA")
    budget = torch.cuda.get_device_properties(0).total_memory / 2**30 * args.fraction
    bargs = argparse.Namespace(model=args.model, layers=args.layers, seqs=[2**21], steps=1, dtype=args.dtype,
                               device="cuda", tiny=False)
    model = bench.build_model(bargs)
    results = []
    for variant in args.variants.split(","):
        probes = [bench.measure(model, variant, s, True, bargs) for s in args.probe]
        ok = [r for r in probes if not r.get("oom")]
        row = dict(variant=variant, probes=[(r["seq"], r.get("peak_gib")) for r in probes], budget_gib=budget)
        if len(ok) >= 2:
            coeffs = fit_peak([r["seq"] for r in ok], [r["peak_gib"] for r in ok])
            guess = predict_max(coeffs, budget, args.multiple)
            row["predicted"] = guess
            capped = guess > args.cap
            guess = min(guess, args.cap)
            for attempt in range(2):
                bargs.seqs, bargs.steps = [guess], 0  # one step: at these lengths attention takes minutes
                check = bench.measure(model, variant, guess, True, bargs)
                bargs.steps = 1
                fitted = sum(c * guess ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))
                row.setdefault("validations", []).append(dict(
                    seq=guess, oom=bool(check.get("oom")), peak_gib=check.get("peak_gib"), fitted_peak_gib=fitted,
                    step_s=check.get("first_s")))
                if not check.get("oom"):
                    row["max_seq_at_least" if capped else "max_seq"] = guess
                    break
                guess = int(guess * 0.9) // args.multiple * args.multiple
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every variant: a call cut off by its time limit keeps what it measured
            import transformers

            pathlib.Path(args.out).write_text(json.dumps(dict(
                torch=torch.__version__, transformers=transformers.__version__, device=torch.cuda.get_device_name(),
                command="python " + " ".join(sys.argv), rows=results), indent=1))
    for r in results:
        found = r.get("max_seq") or (f">= {r['max_seq_at_least']} (predicted {r['predicted']})" if "max_seq_at_least" in r else "n/a")
        print(f"{r['variant']:<14} max seq {found}", file=sys.stderr)


if __name__ == "__main__":
    main()
