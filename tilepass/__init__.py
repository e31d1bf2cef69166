"""tilepass: a torch.compile backend that tiles MLPs along the sequence for long-context training.

    model = torch.compile(model, backend="tilepass")                       # installed entry point
    model = torch.compile(model, backend=tilepass.backend(num_tiles=8))    # configured
    tilepass.report()                                                      # what was tiled, and why not
"""
from __future__ import annotations

from . import report as _report
from . import attention_runtime as _attention_runtime
from . import compat as _compat
from . import runtime as _runtime
from .backend import backend, reset_graph_counter, tilepass_backend
from .dump import dump
from .options import Options, OptionsError, default_mlp_tiles, default_num_tiles
from .report import Record
from .version import __version__

__all__ = [
    "Options", "OptionsError", "Record", "backend", "compile", "default_mlp_tiles", "default_num_tiles", "dump",
    "report", "reset", "tilepass_backend", "__version__",
]


def report() -> list[Record]:
    """One record per candidate region the backend saw since the last :func:`reset`."""
    return _report.records()


def reset() -> None:
    """Forget the records and every cache: tilepass's regions and Dynamo's compiled code.

    Dynamo is reset too because its compiled graphs call regions by key; a graph that
    outlived its regions could not run.
    """
    import torch._dynamo

    torch._dynamo.reset()
    _report.clear()
    _runtime.clear_regions()
    _attention_runtime.clear_masks()
    reset_graph_counter()


def compile(model, **options):
    """Compile ``model`` (an ``nn.Module``) in place with the tilepass backend and return it.

    The module keeps its class, parameters and ``state_dict`` keys, so it can be handed to
    ``transformers.Trainer`` (whose ``torch_compile_backend`` argument only accepts
    accelerate's fixed list of backend names).
    """
    model.compile(backend=backend(**options))
    return model


def _register_without_entry_point() -> None:
    """Make ``backend="tilepass"`` work from a source checkout that pip did not install.

    When the package is installed, Dynamo finds it through the ``torch_dynamo_backends``
    entry point, and registering the same name here too would trip Dynamo's
    duplicate-name assertion, so this only registers when no entry point exists.
    """
    from importlib.metadata import entry_points

    if any(ep.name == "tilepass" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "tilepass" not in _BACKENDS:
        register_backend(tilepass_backend, name="tilepass")


_register_without_entry_point()
# Before Dynamo traces a transformers model (transformers 5.25): a once-only warning inside
# forward, and the kernels package's set/reset around attention inside checkpointed layers,
# would each break the graph there, so no checkpointed layer would be captured; PEFT's DoRA
# breaks it in every adapted layer. See compat.
_compat.ignore_transformers_warning_once()
_compat.log_dynamo_config_without_functions()
_compat.trace_checkpointed_layers_with_side_effects()
_compat.when_imported(_compat._PEFT_INTEGRATIONS, _compat.trace_peft_plain_weights)
