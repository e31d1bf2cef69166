"""Plot a tools/bench.py result file: peak memory and step time per variant vs sequence length.

    python tools/plot_bench.py docs/results/bench_dense_h200.json docs/bench_dense_h200.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = [r for r in data["rows"] if not r.get("oom")]
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
    shape = "Qwen3-30B-A3B-shaped MoE" if rows[0].get("model") == "moe" else "Llama-3.2-1B-shaped"
    fig.suptitle(f"{layers}-layer {shape} stack, bf16, layer checkpointing — {data['device']}, torch {data['torch']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
