"""Options, the entry point, and version gates."""
import pytest
import torch
import torch.nn as nn

import tilepass
from tilepass import compat
from tilepass.options import Options, OptionsError


def test_defaults():
    o = Options.parse(None)
    assert (o.num_tiles, o.tile_tokens, o.downstream, o.mlp, o.moe, o.attention, o.accumulate_fp32) == (
        None, None, "inductor", True, True, None, False)
    assert o.enabled("attention") and o.enabled("mlp")
    assert not Options.parse(downstream="aot_eager").enabled("attention")  # auto: flex only pays off compiled
    assert not Options.parse(attention=False).enabled("attention")


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_tile": 2}, r"unknown tilepass option 'num_tile'; valid options: num_tiles, tile_tokens, downstream, mlp, moe, loss, skip_logits, loss_kernel, attention, attention_kernel, attention_head_groups, save_attention, accumulate_fp32"),
        ({"num_tiles": 0}, r"'num_tiles' must be a positive int"),
        ({"num_tiles": True}, r"'num_tiles' must be a positive int"),
        ({"tile_tokens": 2.5}, r"'tile_tokens' must be a positive int"),
        ({"num_tiles": 2, "tile_tokens": 8}, r"at most one of"),
        ({"downstream": "cudagraphs"}, r"'downstream' must be one of 'inductor', 'aot_eager', 'eager'"),
        ({"mlp": "yes"}, r"'mlp' must be True or False"),
        ({"accumulate_fp32": 1}, r"'accumulate_fp32' must be True or False"),
        ({"moe": None}, r"'moe' must be True or False"),
        ({"attention_kernel": "flash"}, r"'attention_kernel' must be one of 'auto', 'flex', got 'flash'"),
        ({"attention_head_groups": 0}, r"'attention_head_groups' must be a positive int or None"),
        ({"loss_kernel": "triton"}, r"'loss_kernel' must be one of 'auto', 'compiled', 'eager', got 'triton'"),
    ],
)
def test_bad_options_raise_one_clear_error(options, match):
    with pytest.raises(OptionsError, match=match):
        Options.parse(options)
    with pytest.raises(OptionsError, match=match):
        tilepass.backend(**options)


@pytest.mark.parametrize("triton", [True, False])
def test_loss_kernel_auto_compiles_on_cuda_with_inductor_only(monkeypatch, triton):
    monkeypatch.setattr(compat, "has_triton", lambda: triton)
    auto = Options.parse(None)
    assert auto.compile_loss_tile("cuda") is triton
    assert not auto.compile_loss_tile("cpu")
    assert not Options.parse(downstream="aot_eager").compile_loss_tile("cuda")
    assert Options.parse(loss_kernel="compiled").compile_loss_tile("cpu")
    assert not Options.parse(loss_kernel="eager").compile_loss_tile("cuda")


def test_bad_options_through_torch_compile():
    model = nn.Linear(4, 4)
    with pytest.raises(Exception, match="unknown tilepass option 'bogus'"):
        torch.compile(model, backend="tilepass", options={"bogus": 1})(torch.randn(2, 4))


def test_entry_point_resolves_to_the_compiler_function():
    from importlib.metadata import entry_points

    [ep] = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "tilepass"]
    assert ep.load() is tilepass.tilepass_backend
    assert torch._dynamo.lookup_backend("tilepass") is tilepass.tilepass_backend


def test_backend_name_works_in_a_fresh_interpreter_without_import():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "print('tilepass' in sys.modules)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))\n"
        "y = torch.compile(m, backend='tilepass', options={'downstream': 'eager', 'num_tiles': 2})(torch.randn(3, 5, 8))\n"
        "import tilepass; print([r.status for r in tilepass.report()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["False", "['rewritten']"]


def test_configured_backend_callable():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y = torch.compile(model, backend=tilepass.backend(downstream="aot_eager", tile_tokens=4))(x)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    [r] = tilepass.report()
    assert (r.tiles, r.tile_tokens, r.tokens, r.module, r.pattern) == (5, 4, 18, "", "mlp_relu")


def test_default_tiles_depend_on_shapes_only():
    assert tilepass.default_num_tiles(65536, 2048, 2 * 8192) == 8
    assert tilepass.default_num_tiles(74, 64, 352) == 6
    assert tilepass.default_num_tiles(3, 64, 352) == 3
    assert tilepass.default_num_tiles(100, 64, 32) == 1
    assert tilepass.default_mlp_tiles(65536, 2048, 2 * 8192) == 16  # dense MLPs: twice as many
    assert tilepass.default_mlp_tiles(74, 64, 352) == 11
    assert tilepass.default_mlp_tiles(3, 64, 352) == 3  # at most one tile per token


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.silu(self.fc1(x)))


def test_compile_helper_keeps_the_module():
    model = _MLP().double()
    keys = list(model.state_dict())
    same = tilepass.compile(model, downstream="aot_eager", num_tiles=3)
    assert same is model and list(model.state_dict()) == keys
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    model(x)
    assert [r.tiles for r in tilepass.report()] == [3]


@pytest.mark.parametrize("version,ok", [("2.5.1", False), ("2.6.0", True), ("2.11.0+cu130", True), ("2.13.0+cpu", True), ("2.14.0.dev20261101", True)])
def test_version_gate(monkeypatch, version, ok):
    monkeypatch.setattr(compat, "TORCH_VERSION", compat.parse_version(version))
    if ok:
        compat.check_supported_torch()
    else:
        with pytest.raises(RuntimeError, match=r"tilepass needs torch>=2.6; this environment has torch 2.5.1"):
            compat.check_supported_torch()
        with pytest.raises(Exception, match="tilepass needs torch>=2.6"):
            torch.compile(nn.Linear(2, 2), backend="tilepass")(torch.randn(1, 2))


def test_parse_version():
    assert compat.parse_version("2.13.0+cpu") == (2, 13, 0)
    assert compat.parse_version("2.6") == (2, 6, 0)
    with pytest.raises(ValueError):
        compat.parse_version("nightly")


def test_transformers_warning_once_is_ignored_by_dynamo_where_the_set_exists():
    """compat registers transformers' Logger.warning_once in Dynamo's ignore set: torch
    2.13's name, the older alias, or neither (then nothing is registered)."""
    import logging
    import types

    from tilepass import compat

    import transformers.utils.logging  # noqa: F401

    for name in ("ignore_logging_functions", "ignore_logger_methods"):
        config = types.SimpleNamespace(**{name: set()})
        assert compat.ignore_transformers_warning_once(config) is True
        assert getattr(config, name) == {logging.Logger.warning_once}
    assert compat.ignore_transformers_warning_once(types.SimpleNamespace()) is False
    assert logging.Logger.warning_once in torch._dynamo.config.ignore_logging_functions  # done on import


def test_dynamo_config_logging_survives_the_registered_function():
    """torch 2.11 serializes ignore_logging_functions in every compile's metrics (a TypeError
    traceback per compile): where the logger raises, compat wraps it to log no config;
    where it works (torch 2.13) or does not exist, nothing changes."""
    import types

    from tilepass import compat

    def failing():
        raise TypeError("Object of type _lru_cache_wrapper is not JSON serializable")

    utils = types.SimpleNamespace(_get_dynamo_config_for_logging=failing)
    assert compat.log_dynamo_config_without_functions(utils) is True
    assert utils._get_dynamo_config_for_logging() is None
    assert compat.log_dynamo_config_without_functions(utils) is False  # once
    working = types.SimpleNamespace(_get_dynamo_config_for_logging=lambda: "{}")
    assert compat.log_dynamo_config_without_functions(working) is False
    assert working._get_dynamo_config_for_logging() == "{}"
    assert compat.log_dynamo_config_without_functions(types.SimpleNamespace()) is False
    if hasattr(torch._dynamo.utils, "_get_dynamo_config_for_logging"):  # done on import: it serializes
        assert isinstance(torch._dynamo.utils._get_dynamo_config_for_logging(), (str, type(None)))


def test_checkpoint_side_effect_flag_set_where_torch_has_it():
    import types

    from tilepass import compat

    config = types.SimpleNamespace(skip_fwd_side_effects_in_bwd_under_checkpoint=False)
    assert compat.trace_checkpointed_layers_with_side_effects(config) is True
    assert config.skip_fwd_side_effects_in_bwd_under_checkpoint is True
    assert compat.trace_checkpointed_layers_with_side_effects(types.SimpleNamespace()) is False


def test_peft_dequantize_gets_a_traceable_version_for_plain_weights(monkeypatch):
    """compat gives Dynamo a version of PEFT's dequantize_module_weight that returns a plain
    Parameter as the original does and hands anything else (an HQQ module, a subclass
    weight) to a copy of the original; with no substitute_in_graph or no such function,
    nothing is registered."""
    import types

    from tilepass import compat

    def dequantize_module_weight(module):
        return ("original", module)

    registered = {}

    def substitute(original):
        return lambda traceable: registered.setdefault(original, traceable)

    fake = types.SimpleNamespace(dequantize_module_weight=dequantize_module_weight)
    assert compat.trace_peft_plain_weights(fake, substitute) is True
    traceable = registered[dequantize_module_weight]
    plain = torch.nn.Linear(2, 2)
    assert traceable(plain) is plain.weight
    hqq = torch.nn.Linear(2, 2)
    hqq.W_q = None
    assert traceable(hqq) == ("original", hqq)
    buffer_weight = types.SimpleNamespace(weight=torch.ones(2))
    assert traceable(buffer_weight) == ("original", buffer_weight)
    assert compat.trace_peft_plain_weights(fake, substitute) is True  # once: no second registration
    assert len(registered) == 1
    assert compat.trace_peft_plain_weights(types.SimpleNamespace(), substitute) is False

    def dequantize_more(module):  # a PEFT whose function reads names the known versions do not
        return module.weight_scale_inv

    assert compat.trace_peft_plain_weights(types.SimpleNamespace(dequantize_module_weight=dequantize_more),
                                           substitute) is False
    compat._PEFT_SUBSTITUTED.remove(dequantize_module_weight)
    monkeypatch.delattr(torch.compiler, "substitute_in_graph")  # a torch without it
    assert compat.trace_peft_plain_weights(fake) is False


def test_when_imported_runs_now_or_right_after_the_import(tmp_path, monkeypatch):
    import sys

    from tilepass import compat

    seen = []
    compat.when_imported("tilepass.compat", lambda m: seen.append(m.__name__))
    assert seen == ["tilepass.compat"]
    (tmp_path / "late_module_for_tilepass.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    compat.when_imported("late_module_for_tilepass", lambda m: seen.append(m.VALUE))
    assert seen == ["tilepass.compat"]
    import late_module_for_tilepass  # noqa: F401

    assert seen == ["tilepass.compat", 3]
    [finder] = [f for f in sys.meta_path if getattr(f, "name", None) == "late_module_for_tilepass"]
    assert finder.done  # once: it answers no more imports
    del sys.modules["late_module_for_tilepass"]

    def failing(module):
        raise TypeError("a hook that fails")

    compat.when_imported("tilepass.compat", failing)  # logged, not raised: importing tilepass never fails


def test_checkpointed_transformers_layers_are_captured_in_one_graph():
    """transformers 5.25 logs a warning inside forward and (through the kernels package) sets
    a module variable around attention; either would break the graph at every checkpointed
    layer. After importing tilepass, a checkpointed Llama is one graph with both layers as
    checkpoint bodies."""
    from tilepass.tiny_models import tiny_model

    model = tiny_model("llama", attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(input_ids=torch.randint(3, 128, (2, 16)))
    assert len(graphs) == 1
    bodies = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "checkpoint" in str(n.target)]
    assert len(bodies) == 2
