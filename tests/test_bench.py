"""tools/bench.py runs end to end on CPU at tiny sizes (the GPU numbers are in docs/benchmarks.md)."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench(tmp_path, *args):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--device", "cpu", "--steps", "1",
                          "--layers", "2", "--out", str(out), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_dense_smoke(tmp_path):
    data = _bench(tmp_path, "--seqs", "48", "--variants", "eager,tilepass,tilepass@16", "--ckpt", "both")
    rows = {(r["variant"], r["ckpt"]): r for r in data["rows"]}
    assert len(rows) == 6 and all(r["step_s"] > 0 for r in rows.values())
    assert rows[("tilepass", True)]["tiled_regions"] == 2  # inside the checkpointed layers too
    assert rows[("tilepass@16", False)]["tiles"] == [3]
    assert data["command"].startswith("python ")


def test_moe_smoke(tmp_path):
    data = _bench(tmp_path, "--model", "moe", "--seqs", "32", "--variants", "tilepass")
    [row] = data["rows"]
    assert row["tiled_regions"] == 2 and row["rejected"] == []


def test_max_seq_fit_and_prediction():
    sys.path.insert(0, str(ROOT / "tools"))
    import max_seq

    seqs = [16384, 32768, 65536]
    quad = [2.0 + 1e-4 * s + 1e-9 * s * s for s in seqs]  # a peak growing quadratically
    coeffs = max_seq.fit_peak(seqs, quad)
    assert all(abs(a - b) < 1e-6 for a, b in zip(coeffs, [1e-9, 1e-4, 2.0]))
    s = max_seq.predict_max(coeffs, budget=130.0, multiple=1024)
    peak = lambda n: 2.0 + 1e-4 * n + 1e-9 * n * n  # noqa: E731
    assert peak(s) <= 130.0 < peak(s + 1024)
    lin = max_seq.fit_peak(seqs[:2], [1.0 + 2e-4 * n for n in seqs[:2]])
    assert max_seq.predict_max(lin, budget=101.0, multiple=4096) == 499712  # 500000 rounded down
