"""Longest sequence that fits on one GPU, per variant: probe, extrapolate, then prove it.

    python tools/max_seq.py --layers 16 --variants eager,liger,tilepass --probe 32768 65536 \
        --cap 393216 --time-budget 540 --out docs/results/max_seq_h200.json

For each variant, one training step (bench.py's step, layer checkpointing) at each
``--probe`` length gives the peak memory. With flash, cuDNN or flex attention nothing is
O(seq²), so the peak is linear in the length: the line through the two longest runs
predicts the longest length (a multiple of ``--multiple``) under ``--fraction`` of the
GPU's memory. ``compile`` and ``tilepass-mlp`` keep the dense ``[seq, seq]`` mask
transformers builds under compile, so their peak is quadratic: with ``--fit auto`` (the
default) a parabola through their three longest runs predicts instead (give three probes).
One real step at the prediction validates it; the fit is then redrawn through the longest
runs that fit and the search repeats (an out-of-memory step bisects instead),
until the next multiple would not fit, the ``--cap`` is reached, or the next step would
not finish within ``--time-budget`` (attention time grows with seq²: a 16-layer step at
300K tokens takes over a minute on an H200).

Each row reports ``max_seq`` (the longest length a real step ran at), ``bound``
("converged": the next multiple is predicted not to fit, or ran out of memory; "cap";
"time"), and ``extrapolated_max``, the fit's prediction from the longest real runs.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Callable

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


# variants whose graph keeps transformers' dense [seq, seq] attention mask: quadratic peak
QUADRATIC_VARIANTS = ("compile", "tilepass-mlp")


def keeps_dense_mask(variant: str, row: dict) -> bool:
    """Does this variant's graph keep the dense [seq, seq] mask (a quadratic peak)? compile
    and tilepass-mlp, with any tile size; a tilepass variant whose probes routed no site."""
    base = variant.split("@")[0]
    return base in QUADRATIC_VARIANTS or (base.startswith("tilepass") and not row.get("attention_kernels"))


def _fit(points: list[tuple[int, float]], degree: int) -> list[float]:
    """The polynomial of ``degree`` through the ``degree + 1`` longest (seq, peak) points."""
    longest = sorted(points)[-(degree + 1):]
    if len(longest) < degree + 1:
        raise ValueError(f"a degree-{degree} fit needs {degree + 1} runs that fit, got {len(longest)}")
    return fit_peak([s for s, _ in longest], [p for _, p in longest])


def _fit_max(points: list[tuple[int, float]], budget: float, multiple: int, degree: int = 1) -> int:
    """predict_max of the fit through the longest (seq, peak) points."""
    return predict_max(_fit(points, degree), budget, multiple)


def _fit_at(points: list[tuple[int, float]], seq: int, degree: int = 1) -> float:
    coeffs = _fit(points, degree)  # highest power first
    return sum(c * seq ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))


def search_max(points: list[tuple[int, float]], step: Callable[[int], dict], budget: float, multiple: int,
               cap: int, seconds_left: Callable[[], float], last_time: tuple[int, float] | None = None,
               overhead_s: float = 0.0, degree: int = 1) -> dict:
    """Search the longest length that fits, from probe ``points`` [(seq, peak GiB)].

    ``step(seq)`` runs one training step: {"peak_gib", "step_s"} or {"oom": True}.
    ``last_time`` (seq, seconds) of a step, to predict the next one's time (as seq²), plus
    ``overhead_s`` per step (compilation: every length compiles afresh). ``degree``: 1, the
    line through the two longest runs; 2, the parabola through the three longest."""
    points = sorted(points)
    fits, too_long = points[-1][0], None
    guess = predicted = _fit_max(points, budget, multiple, degree)
    row: dict = dict(fit="line" if degree == 1 else "parabola", predicted=predicted, validations=[], bound="converged")
    while True:
        seq = min(guess, cap, too_long - multiple if too_long else guess)
        if seq <= fits:
            break  # the next multiple does not fit (predicted, or ran out of memory)
        if last_time is not None and overhead_s + last_time[1] * (seq / last_time[0]) ** 2 > seconds_left():
            row["bound"] = "time"
            break
        result = step(seq)
        fitted = _fit_at(points, seq, degree)
        row["validations"].append(dict(seq=seq, oom=bool(result.get("oom")), peak_gib=result.get("peak_gib"),
                                       fit_peak_gib=fitted, step_s=result.get("step_s")))
        if result.get("oom"):
            too_long = seq
            guess = (fits + seq) // 2 // multiple * multiple  # bisect between what fits and what did not
            continue
        fits, last_time = seq, (seq, max(result["step_s"] - overhead_s, 1e-9))
        points.append((seq, result["peak_gib"]))
        if seq == cap:
            row["bound"] = "cap"
            break
        guess = _fit_max(points, budget, multiple, degree)
    row["max_seq"] = fits  # the longest length a real step ran at (a probe, if nothing longer fit)
    row["extrapolated_max"] = _fit_max(points, budget, multiple, degree)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "causal", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--variants", default="eager,liger,tilepass")
    p.add_argument("--probe", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--fraction", type=float, default=0.95, help="of the GPU's total memory")
    p.add_argument("--multiple", type=int, default=4096)
    p.add_argument("--cap", type=int, default=524288, help="longest length to run a step at")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds for the whole run: a step predicted to end past it is not started")
    p.add_argument("--fit", choices=["auto", "line", "parabola"], default="auto",
                   help=f"peak model; auto: parabola for {', '.join(QUADRATIC_VARIANTS)}, else line")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("max_seq.py measures GPU memory: it needs CUDA")
    start = time.perf_counter()
    budget = torch.cuda.get_device_properties(0).total_memory / 2**30 * args.fraction
    bargs = argparse.Namespace(model=args.model, layers=args.layers, seqs=[2**21], steps=1, dtype=args.dtype,
                               device="cuda", tiny=False, lora=False)
    model = bench.build_model(bargs)

    def one_step(variant):
        def step(seq):
            bargs.seqs, bargs.steps = [seq], 0  # one step: at these lengths attention takes minutes
            r = bench.measure(model, variant, seq, True, bargs)
            return dict(oom=True) if r.get("oom") else dict(peak_gib=r["peak_gib"], step_s=r["first_s"])
        return step

    results = []
    for variant in args.variants.split(","):
        bargs.steps = 1
        probes = [bench.measure(model, variant, s, True, bargs) for s in args.probe]
        ok = [(r["seq"], r["peak_gib"]) for r in probes if not r.get("oom")]
        row = dict(variant=variant, layers=args.layers, budget_gib=budget,
                   probes=[(r["seq"], r.get("peak_gib"), r.get("step_s")) for r in probes],
                   attention_kernels=probes[-1].get("attention_kernels"))
        degree = 2 if args.fit == "parabola" or (args.fit == "auto" and keeps_dense_mask(variant, row)) else 1
        if len(ok) < degree + 1:
            row["error"] = f"{len(ok)} probes fit; the {'parabola' if degree == 2 else 'line'} needs {degree + 1}"
        else:
            longest = max((r for r in probes if not r.get("oom")), key=lambda r: r["seq"])
            row.update(search_max(ok, one_step(variant), budget, args.multiple, args.cap,
                                  lambda: args.time_budget - (time.perf_counter() - start),
                                  (longest["seq"], longest["step_s"]),
                                  overhead_s=max(0.0, longest["first_s"] - longest["step_s"]), degree=degree))
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every variant: a call cut off by its time limit keeps what it measured
            import transformers

            pathlib.Path(args.out).write_text(json.dumps(dict(
                torch=torch.__version__, transformers=transformers.__version__, device=torch.cuda.get_device_name(),
                command="python " + " ".join(sys.argv), rows=results), indent=1))
    for r in results:
        print(f"{r['variant']:<14} max seq {r.get('max_seq')} ({r.get('bound')}; extrapolated {r.get('extrapolated_max')})",
              file=sys.stderr)


if __name__ == "__main__":
    main()
