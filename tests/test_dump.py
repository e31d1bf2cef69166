"""The graph-dump tool: files, report schema, CLI, env var, TORCH_TRACE, and a real browser."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import torch

import tilepass
from tilepass.dump import REPORT_SCHEMA
from tilepass.tiny_models import tiny_model

from test_custom_mlps import CumsumMLP, GatedMLP

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train_once(model, options, seq=16):
    ids = torch.randint(3, 128, (2, seq), generator=torch.Generator().manual_seed(0))
    out = torch.compile(model, backend="tilepass", options=options)(input_ids=ids, labels=ids)
    out.loss.backward()


def _graph_dirs(root):
    return sorted(p for p in pathlib.Path(root).iterdir() if p.is_dir())


def test_context_manager_writes_every_stage(tmp_path):
    with tilepass.dump(tmp_path / "d") as root:
        _train_once(tiny_model("llama"), dict(downstream="aot_eager", num_tiles=4))
    [g] = _graph_dirs(root)
    stages = sorted(p.name for p in g.glob("stage_*.py"))
    assert stages == ["stage_00_dynamo.py", "stage_01_after_moe.py", "stage_02_after_mlp.py",
                      "stage_03_after_loss.py"]
    before, after = (g / stages[0]).read_text(), (g / stages[2]).read_text()
    assert "tiled_forward" not in before and after.count("torch.ops.tilepass.tiled_forward.default(") == 2
    assert '"f32[2, 16, 176]"' in before  # shape-annotated: the gate projection's output
    report = json.loads((g / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert [(r["kind"], r["pattern"], r["module"], r["tiles"]) for r in report["regions"]] == [
        ("mlp", "swiglu", "model.layers.0.mlp", 4), ("mlp", "swiglu", "model.layers.1.mlp", 4),
        ("loss", "cross_entropy_mean", "lm_head", 4)]
    nodes = report["regions"][0]["nodes"]  # Dynamo's node names (numbering varies with transformers)
    assert [n.rstrip("_0123456789") for n in nodes] == ["linear", "silu", "linear", "mul", "down_proj"]
    for r in report["regions"]:
        program = g / "tile_programs" / f"{r['region_key']}.py"
        compile(program.read_text(), str(program), "exec")  # valid Python
    page = (g / "graph.html").read_text()
    assert page.count('class="rewritten" data-region="r0"') == 5 and 'data-region="r1"' in page
    assert "http" not in page.split("<body>")[1].replace("https://json-schema", "")  # nothing to fetch


def test_rejected_reason_is_in_report_and_page(tmp_path):
    model = CumsumMLP().double()
    with tilepass.dump(tmp_path) as root:
        torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager"))(torch.randn(2, 9, 24, dtype=torch.float64))
    [g] = _graph_dirs(root)
    report = json.loads((g / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["regions"] == []
    [rej] = report["rejected"]
    assert rej["reason"] == "op `cumsum` over dim 1 mixes tokens" and "cumsum" in rej["nodes"]
    page = (g / "graph.html").read_text()
    assert "op `cumsum` over dim 1 mixes tokens" in page and 'class="rejected"' in page


def _run(args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def test_env_var_dumps_are_stable_across_runs(tmp_path):
    script = (
        "import torch\n"
        "from tilepass.tiny_models import tiny_model\n"
        "m = tiny_model('gpt2')\n"
        "ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))\n"
        "torch.compile(m, backend='tilepass', options={'downstream': 'eager', 'num_tiles': 3})(input_ids=ids).logits.sum().backward()\n"
    )
    dumps = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        res = _run(["-c", script], env={"TILEPASS_DUMP_DIR": str(out)})
        assert res.returncode == 0, res.stderr[-2000:]
        dumps.append(out)
    names = [[p.name for p in _graph_dirs(d)] for d in dumps]
    assert names[0] == names[1] and names[0]
    for g0, g1 in zip(_graph_dirs(dumps[0]), _graph_dirs(dumps[1])):
        for f in ("report.json", "stage_00_dynamo.py", "stage_02_after_mlp.py", "graph.html"):
            assert (g0 / f).read_text() == (g1 / f).read_text(), f


def _explain(capsys, *args):
    """``tilepass explain`` in this process (the subprocess tests above cover ``python -m tilepass``)."""
    from tilepass.cli import main

    code = main(["explain", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_dump(tmp_path):
    res = _run(["-m", "tilepass", "dump", "--arch", "mixtral", "--seq", "12", "--out", str(tmp_path / "d"),
                "--option", "num_tiles=3", "--downstream", "aot_eager"])  # the dump, not inductor's kernels
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rewritten  moe" in res.stdout and "dump written to" in res.stdout
    reports = [json.loads((g / "report.json").read_text()) for g in _graph_dirs(tmp_path / "d")]
    for report in reports:
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["options"]["num_tiles"] == 3
    assert [r["kind"] for rep in reports for r in rep["regions"]] == ["moe", "moe", "loss"]


def test_cli_explain(tmp_path, monkeypatch, capsys, routed_graph_on_aot_eager):  # what explain prints, not inductor's kernels
    monkeypatch.chdir(tmp_path)
    code, out, _ = _explain(capsys, "--arch", "gpt2", "--seq", "12", "--eval")
    assert code == 0
    assert "mlp_gelu_tanh" in out and not (tmp_path / "tilepass_dump").exists()
    assert "pass attention: off (downstream='aot_eager'; flex attention is only fast under inductor" in out
    code, out, _ = _explain(capsys, "--arch", "llama", "--seq", "12", "--eval", "--option", "mlp=false",
                            "--option", "attention_kernel=flex", "--downstream", "inductor")
    assert code == 0
    assert "pass mlp: off (mlp=False)" in out and "rewritten  attention" in out and "-> flex" in out
    code, out, err = _explain(capsys, "--arch", "llama", "--option", "num_tile=3")
    assert code == 2 and "unknown tilepass option 'num_tile'" in err and out == ""


def test_cli_checkpointed_layers_and_save_attention(tmp_path, monkeypatch, capsys, routed_graph_on_aot_eager):
    """--checkpoint runs the model as long-context training does (layer checkpointing): the
    dump shows each layer's policy as a row, valid against the schema, and its page renders.
    In this process, and what tilepass hands inductor runs on aot_eager: the dump is written
    before that (the saved attention compiled by inductor: tests/test_save_attention.py)."""
    from tilepass.cli import main

    code = main(["dump", "--arch", "llama", "--seq", "24", "--checkpoint", "--downstream", "inductor",
                 "--option", "save_attention=true", "--out", str(tmp_path / "d")])
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout.count("rewritten  checkpoint") == 2 and "-> sdpa" in stdout
    reports = [json.loads((g / "report.json").read_text()) for g in _graph_dirs(tmp_path / "d")]
    for report in reports:
        jsonschema.validate(report, REPORT_SCHEMA)
    # "model.layers.N" with transformers 5.25 (as named_modules() names them), "layers.N" before
    assert sorted(r["module"].removeprefix("model.") for rep in reports for r in rep["regions"] if r["kind"] == "checkpoint") == [
        "layers.0", "layers.1"]
    pages = "".join((g / "graph.html").read_text() for g in _graph_dirs(tmp_path / "d"))
    assert pages.count("the outputs of SDPA's fused kernels are kept for the backward") == 2
    # 2 MLPs, and the loss where it is in the same graph (transformers 5.25: one graph)
    assert re.search(r"[23] regions tiled, 2 attention sites routed, 2 layers keeping attention's outputs", pages)
    monkeypatch.chdir(tmp_path)
    code, out, _ = _explain(capsys, "--arch", "llama", "--seq", "12", "--eval")
    assert code == 0 and "rewritten  mlp" in out
    assert "save_attention" not in out  # an opt-in pass that is off is not news


def test_cli_local_config_json(tmp_path, capsys):
    cfg = tilepass.tiny_models.tiny_config("qwen3").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = _explain(capsys, "--config", str(tmp_path / "config.json"), "--seq", "8")
    assert code == 0
    assert out.count("rewritten  mlp") == 2


def test_torch_trace_artifacts(tmp_path):
    script = (
        "import torch, tilepass\n"
        "from tilepass.tiny_models import tiny_model\n"
        "m = tiny_model('llama')\n"
        "ids = torch.randint(3, 128, (1, 8))\n"
        f"with tilepass.dump({str(tmp_path / 'd')!r}):\n"
        "    torch.compile(m, backend='tilepass', options={'downstream': 'eager'})(input_ids=ids)\n"
    )
    res = _run(["-c", script], env={"TORCH_TRACE": str(tmp_path / "trace")})
    assert res.returncode == 0, res.stderr[-2000:]
    logs = "".join(p.read_text() for p in (tmp_path / "trace").glob("*"))
    assert '"name": "tilepass_report"' in logs and '"name": "tilepass_stage_02_after_mlp"' in logs


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    model = GatedMLP().double()
    with tilepass.dump(tmp_path / "d") as root:
        torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=2))(
            torch.randn(2, 9, 24, dtype=torch.float64))
    [g] = _graph_dirs(root)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,700"]
    url = (g / "graph.html").resolve().as_uri()
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('class="rewritten"') == 5  # the five ops of the region, rendered
    img = Image.open(shot).convert("RGB")
    green = sum(1 for px in img.getdata() if px == (200, 247, 197))  # the region highlight
    assert green > 5000, green
