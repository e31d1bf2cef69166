"""The README's example and the Trainer example run, and train like eager."""
import importlib.util
import pathlib

import pytest
import torch

import tilepass

from conftest import rewritten

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs(capsys):
    _load("quickstart").main(steps=2, seq=64)
    out = capsys.readouterr().out
    assert "step 1: loss" in out and "tiled    model.layers.1.mlp" in out


def test_trainer_with_tilepass_trains_like_eager(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    trainer_example = _load("trainer")
    tiled_log = trainer_example.main(str(tmp_path / "tiled"), steps=3, seq=64)
    assert len({r.module for r in rewritten()}) == 2
    # Trainer passes num_items_in_batch: the loss is summed, then divided by it
    assert [r.pattern for r in rewritten("loss")] == ["cross_entropy_sum"]

    # The same run without tilepass: Trainer on the plain eager model.
    monkeypatch.setattr(tilepass, "compile", lambda model, **kw: model)
    eager_log = trainer_example.main(str(tmp_path / "eager"), steps=3, seq=64)
    tiled_losses = [e["loss"] for e in tiled_log if "loss" in e]
    eager_losses = [e["loss"] for e in eager_log if "loss" in e]
    assert len(tiled_losses) == 3
    torch.testing.assert_close(torch.tensor(tiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-4)
