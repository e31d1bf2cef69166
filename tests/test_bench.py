"""tools/bench.py runs end to end on CPU at tiny sizes (the GPU numbers are in docs/benchmarks.md)."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench(tmp_path, monkeypatch, *args):
    """tools/bench.py's main with these arguments, as its command line runs it, in this
    process: a new interpreter would spend more on importing and warming up inductor than
    the run itself takes. One decoder layer: the rows count per layer, and the size is not
    the point. Downstream aot_eager unless a test asks for inductor."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    out = tmp_path / "rows.json"
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--layers", "1", "--out", str(out), *args]
    if "--downstream" not in args:
        # The tool's flow and its rows are the point here, not inductor's code (every
        # variant's options through inductor: tests/test_hf_models.py, test_save_attention.py)
        argv += ["--downstream", "aot_eager"]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / "bench.py"), *argv])
    bench.main(argv)
    return json.loads(out.read_text())


# Every variant runs once with layer checkpointing (the benchmark's setting), and the two
# whose rows differ without it run once without; one test per setting, so xdist runs them
# side by side. The variants whose rows depend on attention routing ask for inductor
# (routing follows the downstream compiler), and what tilepass then hands inductor runs on
# aot_eager (conftest.routed_graph_on_aot_eager): the rows are the point, and the headline
# setting compiled by inductor end to end is test_causal_smoke's.
@pytest.mark.parametrize("ckpt,variants,downstream", [
    ("on", "eager,tilepass-mlp,tilepass+save,tilepass+save-nothing", "aot_eager"),
    ("on", "tilepass,tilepass+flex", "inductor"),
    ("off", "tilepass@16,tilepass+save", "aot_eager"),
])
def test_dense_smoke(tmp_path, monkeypatch, routed_graph_on_aot_eager, ckpt, variants, downstream):
    data = _bench(tmp_path, monkeypatch, "--seqs", "48", "--variants", variants, "--ckpt", ckpt,
                  "--downstream", downstream)
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == variants.split(",") and all(r["step_s"] > 0 and r["ckpt"] == (ckpt == "on") for r in rows.values())
    assert data["command"].startswith("python ") and f"--downstream {downstream}" in data["command"]
    if ckpt == "off":
        assert rows["tilepass@16"]["tiles"] == [3]
        assert rows["tilepass+save"]["saved_attention_layers"] == 0  # no checkpoint, nothing to keep
        return
    if downstream == "aot_eager":
        assert rows["tilepass+save-nothing"]["saved_attention_layers"] == 1  # the policy, keeping nothing
        assert rows["tilepass+save"]["saved_attention_layers"] == 1  # the checkpointed layer keeps attention's outputs
        assert rows["tilepass-mlp"]["tiled_regions"] == 1  # inside the checkpointed layer too
        assert rows["tilepass-mlp"]["routed_attention"] == 0  # attention off
        return
    assert rows["tilepass"]["tiled_regions"] == 1
    # checkpointed layers read a dense causal mask under compile: the default routes it to SDPA's
    # causal kernel; flex (no CPU backward) leaves it
    assert rows["tilepass"]["routed_attention"] == 1
    assert rows["tilepass+flex"]["routed_attention"] == 0


def test_causal_smoke(tmp_path, monkeypatch):
    """The causal LM trained from labels: the LM head + loss is one region, its logits dropped."""
    data = _bench(tmp_path, monkeypatch, "--model", "causal", "--seqs", "32", "--variants", "tilepass+skip",
                  "--downstream", "inductor")  # the headline benchmark's setting, once end to end
    [row] = data["rows"]
    assert row["loss_regions"] == 1 and row["kept_logits_gib"] == 0 and row["rejected"] == []


def test_moe_smoke(tmp_path, monkeypatch):
    data = _bench(tmp_path, monkeypatch, "--model", "moe", "--seqs", "32", "--variants", "tilepass")
    [row] = data["rows"]
    assert row["tiled_regions"] == 1 and row["rejected"] == []


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


def test_max_seq_search_converges_bisects_and_stops_at_the_cap(monkeypatch, tmp_path):
    """max_seq.main without a GPU: bench.measure replaced by a peak model, out of memory
    above 100 GiB. A line through the probes undershoots a concave peak and overshoots
    past a jump; the search validates, redraws the line through real runs, bisects after
    an OOM, and ends at the longest length that ran; a flat peak ends at the cap; a step
    predicted to overrun the time budget is not started."""
    import types

    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    import max_seq
    import torch

    peaks = {
        "concave": lambda s: 2.0 + 0.01 * s ** 0.75,  # the line through the probes undershoots
        "jump": lambda s: 2.0 + 2e-4 * s + (40.0 if s > 300000 else 0.0),  # the line overshoots past 300K
        "flat": lambda s: 1.0 + 1e-5 * s,
    }
    calls = []

    def fake_measure(model, variant, seq, ckpt, args):
        calls.append((variant, seq))
        peak = peaks[variant](seq)
        if peak > 100:
            return dict(seq=seq, oom=True)
        return dict(seq=seq, peak_gib=peak, step_s=1e-9 * seq * seq, first_s=1e-9 * seq * seq)

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "build_model", lambda args: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=100 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "fake")
    out = tmp_path / "m.json"
    max_seq.main(["--variants", "concave,jump,flat", "--fraction", "1.0", "--cap", "1048576", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("concave", "jump"):
        r = rows[name]
        top = r["max_seq"]
        assert r["bound"] == "converged" and peaks[name](top) <= 100 < peaks[name](top + 4096), (name, r)
        assert top == max(v["seq"] for v in r["validations"] if not v["oom"])
    assert rows["concave"]["predicted"] < rows["concave"]["max_seq"]  # the search went past the first line
    assert any(v["oom"] for v in rows["jump"]["validations"])  # ... and bisected back
    assert rows["flat"]["bound"] == "cap" and rows["flat"]["max_seq"] == 1048576
    assert rows["flat"]["extrapolated_max"] > 1048576
    v = rows["flat"]["validations"][0]
    assert abs(v["fit_peak_gib"] - peaks["flat"](v["seq"])) < 1e-9

    calls.clear()  # a step predicted (seq² from the last one) to overrun the time budget is not run
    max_seq.main(["--variants", "concave", "--fraction", "1.0", "--time-budget", "10", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["bound"] == "time" and row["max_seq"] == 65536 and calls == [("concave", 32768), ("concave", 65536)]


def test_max_seq_fits_a_parabola_for_variants_with_a_dense_mask(monkeypatch, tmp_path):
    """compile and tilepass-mlp keep transformers' [seq, seq] mask: their peak is quadratic,
    the line through two probes would overshoot it; the parabola through three predicts the
    longest length exactly, and two probes are not enough for it."""
    import types

    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    import max_seq
    import torch

    peak = lambda s: 2.0 + 1e-4 * s + 1e-9 * s * s  # noqa: E731
    monkeypatch.setattr(bench, "measure", lambda model, variant, seq, ckpt, args: (
        dict(seq=seq, oom=True) if peak(seq) > 100 else dict(seq=seq, peak_gib=peak(seq), step_s=0.0, first_s=0.0)))
    monkeypatch.setattr(bench, "build_model", lambda args: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=100 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "fake")
    out = tmp_path / "m.json"
    max_seq.main(["--variants", "compile", "--probe", "16384", "32768", "65536", "--fraction", "1.0", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["fit"] == "parabola" and row["bound"] == "converged"
    assert row["predicted"] == row["max_seq"] and peak(row["max_seq"]) <= 100 < peak(row["max_seq"] + 4096)
    assert abs(row["validations"][0]["fit_peak_gib"] - peak(row["max_seq"])) < 1e-6
    max_seq.main(["--variants", "tilepass-mlp", "--probe", "32768", "65536", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["error"] == "2 probes fit; the parabola needs 3" and "max_seq" not in row


def test_plots_of_the_committed_results(tmp_path):
    """tools/plot_bench.py draws each kind of result file docs/benchmarks.md shows: lines
    over lengths, bars at one length, the longest-sequence chart over several files
    (leaving out a row another file supersedes), and what is alive at a step's peak."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    import plot_bench

    results = ROOT / "docs" / "results"
    cases = {
        "lines": [results / "bench_dense_h200_v2.json"],
        "bars": [results / "bench_moe_defaults_h200.json"],
        "max_seq": [results / "max_seq_dense_quadratic_h200.json", results / "max_seq_dense_more_h200.json"],
        "memory_peak": [results / "memory_peak_dense_h200.json"],
    }
    for name, sources in cases.items():
        dst = tmp_path / f"{name}.png"
        plot_bench.main(*map(str, sources), str(dst))
        with Image.open(dst) as img:
            assert img.size[0] > 500 and img.size[1] > 200, (name, img.size)
    more = json.loads((results / "max_seq_dense_more_h200.json").read_text())
    assert [r["variant"] for r in more["rows"] if r.get("superseded_by")] == ["compile"]


def test_max_seq_picks_the_parabola_for_every_dense_mask_variant():
    sys.path.insert(0, str(ROOT / "tools"))
    import max_seq

    routed, unrouted = dict(attention_kernels=["sdpa"]), dict(attention_kernels=[])
    assert max_seq.keeps_dense_mask("compile", routed) and max_seq.keeps_dense_mask("tilepass-mlp@4096", unrouted)
    assert max_seq.keeps_dense_mask("tilepass", unrouted)  # routing declined: the mask stays
    assert not max_seq.keeps_dense_mask("tilepass", routed) and not max_seq.keeps_dense_mask("eager", dict())



def test_the_save_nothing_control_keeps_no_op_and_is_undone():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    from tilepass import checkpoint_policy

    real = checkpoint_policy.saved_attention_ops()
    bench._keep_nothing(True)
    try:
        assert checkpoint_policy.saved_attention_ops() == frozenset()
        assert checkpoint_policy.save_attention_context_fn().cache_hash != "tilepass.save_attention:" + ",".join(
            sorted(map(str, real)))  # its graphs never come from the real policy's cache
    finally:
        bench._keep_nothing(False)
    assert checkpoint_policy.saved_attention_ops() == real and real


def test_memory_peak_replays_the_allocator_trace():
    """tools/memory_peak.py finds the peak of a trace and the blocks alive there (frees of
    blocks allocated before the trace are ignored; a block freed before the peak is not alive)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import memory_peak

    def alloc(addr, size):
        return dict(action="alloc", addr=addr, size=size)

    def free(addr, size):
        return dict(action="free_completed", addr=addr, size=size)

    events = [alloc(1, 10), free(99, 500), alloc(2, 30), free(1, 10), alloc(3, 5), alloc(4, 1), free(4, 1),
              alloc(5, 20), free(2, 30), alloc(6, 40)]
    peak, at, blocks = memory_peak.peak_live(events)
    # totals: 10, 10, 40, 30, 35, 36, 35, 55, 25, 65: the peak is the last alloc
    assert (peak, at) == (65, 9)
    assert sorted(b["addr"] for b in blocks) == [3, 5, 6]
    frames = [dict(filename=memory_peak.TORCH_DIR + "/x.py", line=1, name="inner"),
              dict(filename=__file__, line=1, name="<module>")]
    assert memory_peak.site(frames).startswith("test_bench.py:1 <module>: ")


def test_memory_peak_kinds():
    """The peak chart's labels, from memory_peak.py's allocation sites."""
    sys.path.insert(0, str(ROOT / "tools"))
    import plot_bench

    assert plot_bench.peak_kind("c1.py:9 call: buf7 = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(") \
        == "attention backward"
    assert plot_bench.peak_kind("runtime.py:176 run_tiled_backward: tile_grads = ...") == "tiled MLP (tilepass runtime)"
    assert plot_bench.peak_kind("activations.py:103 forward: return nn.functional.silu(input)") == "MLP"
    assert plot_bench.peak_kind("(no frame outside torch)") == "autograd engine (backward buffers)"


def test_cudnn_modifier_needs_cuda_and_unknown_variants_name_the_valid_ones():
    import types

    import pytest

    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    cpu = types.SimpleNamespace(device="cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        bench.make_step(None, "tilepass+save+cudnn", cpu)
    with pytest.raises(ValueError, match=r"valid: eager, compile, liger, cce, tilepass-mlp.*'\+cudnn' last"):
        bench.make_step(None, "tilepass+bogus", cpu)
