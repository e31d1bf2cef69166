"""tools/multigpu.py: tilepass under DDP, FSDP2 and DeepSpeed ZeRO-3, two processes under torchrun.

On CPU (gloo, aot_eager/eager downstream): the HF models under DDP and FSDP2, ZeRO-3 when
DeepSpeed is installed, and proof that the script's checks fail when they should. On two
CUDA GPUs (NCCL, inductor): the same, plus memory per rank at 64K tokens. The tiny
``nn.Module`` DDP/FSDP2 tests of tests/test_distributed.py (spawned, no torchrun, gradients
to 1e-10 in float64) stay as they are; these add transformers models, per-layer sharding,
different lengths per rank, reduction counts and ZeRO-3.
"""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "multigpu.py"
CPU = ("--backend", "gloo", "--device", "cpu")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"needs 2 CUDA GPUs for the NCCL run (found {GPUS}): "
                     "torchrun --standalone --nproc-per-node 2 tools/multigpu.py")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install deepspeed: a pure-Python sdist, about 20 s; "
                              "no CUDA op is built for ZeRO-3 with a torch optimizer)")


def _load_script():
    if "tilepass_tools_multigpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tilepass_tools_multigpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["tilepass_tools_multigpu"]


def _launch(*args, timeout=600):
    """Run the script in two processes; (exit status, rank 0's JSON rows, the whole log).
    ``--standalone`` picks a free port, so parallel tests do not collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return res.returncode, rows, res.stdout[-4000:] + res.stderr[-6000:]


def _steps(rows):
    return [r for r in rows if not r.get("summary")]


def _assert_all_passed(rc, rows, log, engines, models, steps):
    assert rc == 0, log
    got = _steps(rows)
    failed = [r for r in got if not r["ok"]]
    assert not failed, failed[:4]
    assert {(r["model"], r["engine"]) for r in got} == {(m, e) for m in models for e in engines}
    assert len(got) == len(models) * len(engines) * steps * 2  # every step on both ranks
    for model in models:
        for engine in engines:
            by_rank = {r["rank"]: r for r in got if (r["model"], r["engine"], r["step"]) == (model, engine, 0)}
            # each rank its own length, its own tile count (tile_tokens 16): 192 and 150 tokens
            assert by_rank[0]["region_tokens"] != by_rank[1]["region_tokens"]
            assert by_rank[0]["region_tiles"] != by_rank[1]["region_tiles"]
            assert by_rank[0]["reductions"] == by_rank[0]["grads"]  # once per parameter
            if by_rank[0]["loss_calls"]:  # the loss region, where the graph holds LM head and loss together
                assert by_rank[0]["loss_tiles"] != by_rank[1]["loss_tiles"]


# --- the checks themselves, in process ---------------------------------------------


def test_step_problems_catch_a_doubled_gradient_and_a_second_reduction():
    mg = _load_script()
    g = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    loss = torch.tensor(2.5)
    ok = mg.step_problems(loss, loss, dict(g), g, {"w": 1, "b": 1}, ["w", "b"], 1e-5)
    assert ok["problems"] == [] and ok["reductions"] == 2
    doubled = mg.step_problems(loss, loss, {"w": 2 * g["w"], "b": g["b"]}, g, {"w": 1, "b": 1}, ["w", "b"], 1e-5)
    assert doubled["problems"] == ["1 gradients off, worst w rel 1.00e+00"]
    twice = mg.step_problems(loss, loss, dict(g), g, {"w": 2, "b": 1}, ["w", "b"], 1e-5)
    assert twice["problems"] == ["not reduced once per step: {'w': 2}"]
    never = mg.step_problems(loss * 1.001, loss, {"w": g["w"]}, g, {"w": 1}, ["w", "b"], 1e-5)
    assert [p.split(" ")[0] for p in never["problems"]] == ["loss", "no", "not"]


def test_tile_summary_wants_this_ranks_tokens_and_tiles(monkeypatch):
    mg = _load_script()
    record = type("R", (), dict(region_key="k", kind="mlp"))()
    monkeypatch.setattr(mg.tilepass, "report", lambda: [record])
    calls = [dict(phase="forward", key="k", tokens=150, tiles=10), dict(phase="backward", key="k", tokens=150, tiles=10)]
    assert mg._tile_summary(calls, 150, 16)["problems"] == []
    assert mg._tile_summary(calls, 192, 16)["problems"] == [
        "mlp forward: 150 tokens in 10 tiles, this rank has 192 tokens (12 tiles)"]
    assert mg._tile_summary(calls[:1], 150, 16)["problems"] == ["1 tiled forwards but 0 tiled backwards"]
    assert mg._tile_summary([], 150, 16)["problems"] == ["no tiled region ran"]


# --- CPU, gloo ------------------------------------------------------------------------


def test_cpu_llama_and_qwen3_moe_under_ddp_and_fsdp2():
    """About 55 s on 2 cores: 2 models x 3 engines x 2 steps, different lengths per rank."""
    engines, models = ["ddp", "fsdp2-layer", "fsdp2-model"], ["llama", "qwen3_moe"]
    rc, rows, log = _launch(*CPU, "--engines", ",".join(engines), "--models", ",".join(models), "--steps", "2")
    _assert_all_passed(rc, rows, log, engines, models, 2)


def test_cpu_a_collective_inside_a_region_fails_the_run():
    """The watch over the regions is real: an all-reduce inside each region is reported."""
    rc, rows, log = _launch(*CPU, "--engines", "ddp", "--models", "llama", "--steps", "1", "--layers", "1",
                            "--downstream", "eager", "--inject", "collective")
    assert rc == 1, log
    problems = [p for r in _steps(rows) for p in r["problems"]]
    assert problems and all(p.startswith("collectives inside a region: ") for p in problems), problems


@needs_deepspeed
def test_cpu_zero3():
    """One layer, two steps: most of the time is the first step (DeepSpeed's hooks break the
    graph around every module, and Dynamo retraces each piece)."""
    rc, rows, log = _launch(*CPU, "--engines", "zero3", "--models", "llama", "--steps", "2", "--layers", "1",
                            "--downstream", "eager")
    _assert_all_passed(rc, rows, log, ["zero3"], ["llama"], 2)


# --- two GPUs, NCCL -------------------------------------------------------------------


@needs_two_gpus
def test_nccl_ddp_fsdp2():
    engines, models = ["ddp", "fsdp2-layer", "fsdp2-model"], ["llama", "qwen3_moe"]
    rc, rows, log = _launch("--engines", ",".join(engines), timeout=1200)
    _assert_all_passed(rc, rows, log, engines, models, 3)


@needs_two_gpus
@needs_deepspeed
def test_nccl_zero3():
    rc, rows, log = _launch("--engines", "zero3", timeout=1200)
    _assert_all_passed(rc, rows, log, ["zero3"], ["llama", "qwen3_moe"], 3)


@needs_two_gpus
def test_nccl_memory_fsdp2_below_one_gpu(tmp_path):
    """64K tokens per rank, 4-layer Llama-3.2-1B shapes, bf16: FSDP2 shards weights, gradients
    and AdamW's state, so each rank peaks below the same model alone on its GPU."""
    out = tmp_path / "memory.json"
    rc, rows, log = _launch("--mode", "memory", "--out", str(out), timeout=1200)
    assert rc == 0, log
    got = json.loads(out.read_text())["rows"]
    for rank in (0, 1):
        alone, = [r for r in got if r["rank"] == rank and r["run"] == "1-gpu"]
        sharded, = [r for r in got if r["rank"] == rank and r["run"] == "fsdp2"]
        assert sharded["peak_gib"] < alone["peak_gib"], (alone, sharded)
