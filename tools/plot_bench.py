"""Plot a tools/bench.py or tools/max_seq.py result file.

    python tools/plot_bench.py docs/results/bench_dense_h200.json docs/bench_dense_h200.png
    python tools/plot_bench.py docs/results/max_seq_a.json docs/results/max_seq_b.json docs/max_seq_h200.png

bench.py rows: peak memory and step time per variant against the sequence length (bars,
when every row has the same length; with a ``liger`` row, dashed lines at 0.85x its peak
and 0.9x its step, the causal targets).
max_seq.py rows (several files may be given, the last argument is the image): per variant,
the longest length a real step ran at, and the line's extrapolation from the two longest runs.
memory_peak.py rows: per variant, what is alive at the step's peak, stacked by kind.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_bench(data: dict, dst: str) -> None:
    rows = [r for r in data["rows"] if not r.get("oom")]
    if len({r["seq"] for r in rows}) == 1:
        return plot_bars(data, rows, dst)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["seq"], r["peak_gib"], r["step_s"]) for r in rows if r["variant"] == variant)
        seqs = [p[0] // 1024 for p in pts]
        ax_mem.plot(seqs, [p[1] for p in pts], marker="o", label=variant)
        ax_time.plot(seqs, [p[2] for p in pts], marker="o", label=variant)
    ax_mem.set(xlabel="sequence length (K tokens)", ylabel="peak memory (GiB)", title="peak memory")
    ax_time.set(xlabel="sequence length (K tokens)", ylabel="step time (s)", title="fwd+bwd step time")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    layers = rows[0]["layers"]
    shape = {"moe": "Qwen3-30B-A3B-shaped MoE", "causal": "Llama-3.2-1B-shaped causal LM (vocab 128,256)"}.get(
        rows[0].get("model"), "Llama-3.2-1B-shaped")
    fig.suptitle(f"{layers}-layer {shape} stack, bf16, layer checkpointing — {data['device']}, torch {data['torch']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def plot_bars(data: dict, rows: list[dict], dst: str) -> None:
    """One sequence length: peak memory and step time per variant, as bars (eager's marked)."""
    names = [r["variant"] for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 1.4 + 0.45 * len(rows)))
    ys = range(len(rows))
    for ax, key, unit in ((ax_mem, "peak_gib", "GiB"), (ax_time, "step_s", "s")):
        values = [r[key] for r in rows]
        ax.barh(ys, values, color=["#969696" if n == "eager" else "#2171b5" for n in names])
        for y, v in zip(ys, values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(list(ys), names if ax is ax_mem else [""] * len(rows))
        ax.invert_yaxis()
        ax.set(xlabel=f"{'peak memory' if key == 'peak_gib' else 'fwd+bwd step time'} ({unit})",
               xlim=(0, max(values) * 1.2))
        liger = next((r[key] for r in rows if r["variant"] == "liger"), None)
        if liger is not None:  # issue 14's targets: peak <= 0.85x, step <= 0.9x Liger's, in one run
            share = 0.85 if key == "peak_gib" else 0.9
            ax.axvline(liger * share, color="#d94801", ls="--", lw=1)
            ax.text(liger * share, len(rows) - 0.4, f"{share}× Liger ", color="#d94801", ha="right", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    layers, seq = rows[0]["layers"], rows[0]["seq"]
    shape = {"moe": "Qwen3-30B-A3B-shaped MoE", "causal": "Llama-3.2-1B-shaped causal LM (vocab 128,256)"}.get(
        rows[0].get("model"), "Llama-3.2-1B-shaped")
    fig.suptitle(f"{layers}-layer {shape} stack, {seq // 1024}K tokens, bf16, layer checkpointing\n"
                 f"{data['device']}, torch {data['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def plot_max_seq(files: list[dict], dst: str) -> None:
    # a row another file's run replaces (e.g. a wrong fit) says so and is not drawn
    rows = [r for data in files for r in data["rows"] if "max_seq" in r and not r.get("superseded_by")]
    names = [r["variant"] + (f" ({'/'.join(r['attention_kernels'])} attention)" if r.get("attention_kernels") else "")
             for r in rows]
    ran = [r["max_seq"] / 1024 for r in rows]
    line = [(r.get("extrapolated_max") or r["max_seq"]) / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(rows)))
    ys = range(len(rows))
    ax.barh(ys, line, color="#c6dbef", label="extrapolated (fit through the longest real runs)")
    ax.barh(ys, ran, color="#2171b5", label="a real training step ran at")
    for y, a, b in zip(ys, ran, line):
        ax.text(b, y, f" {b:.0f}K", va="center")
        ax.text(a, y, f"{a:.0f}K ", va="center", ha="right", color="white")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set(xlabel="sequence length (K tokens)", xlim=(0, max(line) * 1.18))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, fontsize=8, frameon=False)
    data = files[0]
    ax.set_title(f"longest sequence, {rows[0].get('layers', 16)}-layer Llama-3.2-1B-shaped stack, bf16, checkpointing\n"
                 f"{data['device']}, torch {data['torch']}, {rows[0]['budget_gib']:.0f} GiB budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def peak_kind(site: str) -> str:
    """A coarse label for an allocation site of tools/memory_peak.py."""
    if "attention_backward" in site:
        return "attention backward"
    if "attention" in site:
        return "attention output, lse"
    if site.startswith("runtime.py"):
        return "tiled MLP (tilepass runtime)"
    if site.startswith(("modeling_", "activations.py")) and ("mlp" in site or "proj" in site or "silu" in site):
        return "MLP"
    if site.startswith("(no frame"):
        return "autograd engine (backward buffers)"
    return "other activations"


def plot_memory_peak(data: dict, dst: str) -> None:
    rows = data["rows"]
    kinds: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        for t in r["top"]:
            kinds.setdefault(peak_kind(t["site"]), [0.0] * len(rows))[i] += t["mib"] / 1024
    kinds["smaller blocks"] = [r["step_peak_gib"] - sum(t["mib"] for t in r["top"]) / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(rows)))
    left = [0.0] * len(rows)
    names = [r["variant"] for r in rows]
    for kind, gib in kinds.items():
        ax.barh(names, gib, left=left, label=kind)
        left = [a + b for a, b in zip(left, gib)]
    ax.set(xlabel="GiB alive at the step's peak, above the weights", title="what is alive at the peak")
    ax.invert_yaxis()
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{rows[0]['layers']}-layer stack, {rows[0]['seq'] // 1024}K tokens, layer checkpointing — "
                 f"{data['device']}, torch {data['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def main(*paths: str) -> None:
    *srcs, dst = paths
    files = [json.load(open(s)) for s in srcs]
    if "probes" in files[0]["rows"][0]:
        plot_max_seq(files, dst)
    elif "top" in files[0]["rows"][0]:
        plot_memory_peak(files[0], dst)
    else:
        plot_bench(files[0], dst)


if __name__ == "__main__":
    main(*sys.argv[1:])
