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


def test_max_seq_main_validates_caps_and_retries(monkeypatch, tmp_path):
    """max_seq.main without a GPU: bench.measure replaced by a peak model. A prediction
    under the cap is validated (one OOM: cut by 10 % and retried); one above the cap is
    validated at the cap and reported as a lower bound."""
    import types

    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    import max_seq
    import torch

    peaks = {"steep": lambda s: 1.0 + 4e-9 * s * s, "flat": lambda s: 1.0 + 1e-5 * s}
    seen = []

    def fake_measure(model, variant, seq, ckpt, args):
        seen.append((variant, seq))
        peak = peaks[variant](seq)
        if variant == "steep" and seq > 150000 and len([v for v in seen if v[0] == "steep"]) == 4:
            return dict(seq=seq, oom=True)  # the first validation runs out of memory
        return dict(seq=seq, peak_gib=peak, step_s=1.0)

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "build_model", lambda args: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=100 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "fake")
    out = tmp_path / "m.json"
    max_seq.main(["--variants", "steep,flat", "--fraction", "1.0", "--cap", "262144", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    steep, flat = rows["steep"], rows["flat"]
    assert steep["predicted"] == 155648 and [v["oom"] for v in steep["validations"]] == [True, False]
    assert steep["max_seq"] == steep["validations"][1]["seq"] == 139264  # 0.9 x, rounded to 4096
    assert flat["predicted"] > 262144 and flat["max_seq_at_least"] == 262144 and "max_seq" not in flat
    assert abs(flat["validations"][0]["fitted_peak_gib"] - peaks["flat"](262144)) < 1e-9
