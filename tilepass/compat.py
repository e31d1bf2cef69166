"""Every torch-version and torch-internals dependency of tilepass, in one place.

Other modules ask this one a question ("can flex attention run a backward here?",
"give me a context where autograd records inside a custom op") instead of reading
``torch.__version__`` themselves, so that each branch can be unit-tested by
monkeypatching :data:`TORCH_VERSION`.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import re
import sys
from typing import Iterator

import torch

MIN_TORCH = (2, 6)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release suffixes are ignored."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"cannot parse a torch version from {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


TORCH_VERSION: tuple[int, int, int] = parse_version(torch.__version__)


def check_supported_torch() -> None:
    """Raise a clear error on a torch older than tilepass supports."""
    if TORCH_VERSION[:2] < MIN_TORCH:
        have = ".".join(map(str, TORCH_VERSION))
        need = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(f"tilepass needs torch>={need}; this environment has torch {have}")


# Dispatch keys that a custom op's kernel runs with excluded (the autograd layer sits
# above it). The tiled backward recomputes one tile with autograd, so it lifts exactly
# these exclusions again, and nothing else: autocast keys stay as the caller set them.
_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor")


@contextlib.contextmanager
def autograd_inside_custom_op() -> Iterator[None]:
    """Let autograd record ops inside the body of a ``torch.library.custom_op``.

    A custom op's kernel is dispatched below the autograd key, so ``torch.enable_grad()``
    alone records nothing there. This re-includes the autograd keys in the thread-local
    dispatch state for the duration of the block.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def has_triton() -> bool:
    """Can inductor generate GPU kernels here (is a working triton installed)?"""
    try:
        from torch.utils._triton import has_triton as _has_triton
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return bool(_has_triton())


def compiled_tiles_need_fresh_thread(device_type: str) -> bool:
    """Must a tile program compiled by inductor run outside the custom op's dispatch state?

    Inside a custom op's kernel, autograd's keys are excluded; compiling there with them
    re-included (:func:`autograd_inside_custom_op`) hit an internal assert on CUDA with torch
    2.11 (``PythonFallbackKernel.cpp``, ``tls_on_entry``), so on CUDA the compiled tiles run in
    a fresh thread, whose dispatch state is the default. No newer CUDA torch has been seen to
    fix it, so every CUDA torch takes that path. On CPU (torch 2.6 to 2.13) the compile
    works in place, and the tiles run in the caller's thread."""
    return device_type == "cuda"


def ignore_transformers_warning_once(config=None) -> bool:
    """Let Dynamo trace through transformers' ``logger.warning_once`` (as a no-op).

    transformers 5.25 calls it inside a model's forward (``use_cache=True`` with gradient
    checkpointing in training). Dynamo breaks the graph at a logging call unless the
    function is in its ignore set, and with those breaks no checkpointed layer is captured
    whole, so nothing inside it can be tiled. The set is ``ignore_logging_functions``
    (torch 2.13; ``ignore_logger_methods`` before it, an alias since). Under compile the
    once-only warning is then not printed; the code it guards runs as before. Returns
    whether the function was registered (False: no transformers, or no such set)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    importlib.import_module("transformers.utils.logging")  # it defines Logger.warning_once

    function = getattr(logging.Logger, "warning_once", None)
    config = torch._dynamo.config if config is None else config
    ignored = getattr(config, "ignore_logging_functions", None)
    if ignored is None:
        ignored = getattr(config, "ignore_logger_methods", None)
    if function is None or ignored is None:
        return False
    ignored.add(function)
    return True


def log_dynamo_config_without_functions(utils=None) -> bool:
    """Keep Dynamo's compile metrics from failing on a function in its config.

    Every compile logs Dynamo's config as JSON. torch 2.13 leaves the function sets out
    (``ignore_logging_functions`` and its alias); torch 2.11 leaves out only the alias, so
    with transformers' ``warning_once`` registered (:func:`ignore_transformers_warning_once`)
    every compile on 2.11 printed a ``TypeError`` traceback ("Object of type
    _lru_cache_wrapper is not JSON serializable"), about 4,000 lines for a 4-layer model,
    though nothing failed. This asks the logger itself: where it raises ``TypeError``, the
    metrics are logged with no config (``None``, a value the field already allows).
    Returns whether the logger was wrapped."""
    utils = torch._dynamo.utils if utils is None else utils
    config_for_logging = getattr(utils, "_get_dynamo_config_for_logging", None)
    if config_for_logging is None or getattr(config_for_logging, "without_functions", False):
        return False
    try:
        config_for_logging()
        return False
    except TypeError:
        pass

    def config_or_none():
        try:
            return config_for_logging()
        except TypeError:
            return None

    config_or_none.without_functions = True
    utils._get_dynamo_config_for_logging = config_or_none
    return True


def trace_checkpointed_layers_with_side_effects(config=None) -> bool:
    """Let Dynamo capture a checkpointed layer whose forward mutates Python state.

    transformers 5.25 requires the ``kernels`` package, whose wrapper around an attention
    module's forward sets and resets a module-level variable on every call. Inside
    ``torch.utils.checkpoint`` Dynamo refuses such a side effect ("HOP: Unsafe side
    effect") and breaks the graph. No checkpointed layer is then captured whole, so nothing
    inside it is tiled or routed. With ``skip_fwd_side_effects_in_bwd_under_checkpoint``
    the side effect runs once, in the forward, and is not replayed in the backward's
    recompute, which for a set-then-reset is the same state. Returns whether it was set
    (False: a torch without the flag)."""
    config = torch._dynamo.config if config is None else config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return False
    config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return True


_PEFT_SUBSTITUTED: list = []  # the PEFT function given a traceable version (once per process)


def trace_peft_plain_weights(integrations=None, substitute=None) -> bool:
    """Let Dynamo trace PEFT's ``dequantize_module_weight`` for a weight that is not quantized.

    DoRA calls it in every forward. For an HQQ, torchao or bitsandbytes weight it
    dequantizes; for a plain ``nn.Parameter`` it returns the weight. Its torchao test,
    ``type(module.weight).__module__.startswith("torchao.")``, is a method Dynamo cannot
    trace ("Dynamo does not know how to trace method `startswith` of class `str`"), so every
    DoRA layer breaks the graph, no MLP is whole in any graph, and none is tiled. This gives
    Dynamo a version to trace in its place (``torch.compiler.substitute_in_graph``): a plain
    ``nn.Parameter`` on a module that is not HQQ's is returned, as the original returns it;
    anything else goes to a copy of the original, traced (and broken) as before. Eager calls
    are unchanged. Returns whether it was registered (False: PEFT not imported yet, a PEFT
    without the function, or a torch without ``substitute_in_graph``). See
    :func:`when_imported` for a PEFT imported after tilepass."""
    import types

    if integrations is None:
        integrations = sys.modules.get(_PEFT_INTEGRATIONS)
    if integrations is None:
        return False
    original = getattr(integrations, "dequantize_module_weight", None)
    substitute = substitute or getattr(torch.compiler, "substitute_in_graph", None)
    if original is None or substitute is None:
        return False
    if original in _PEFT_SUBSTITUTED:
        return True
    if not set(original.__code__.co_names) <= _PEFT_DEQUANTIZE_NAMES:
        return False  # a PEFT whose function does more than the versions this stands in for
    as_before = types.FunctionType(original.__code__, original.__globals__, original.__name__,
                                   original.__defaults__, original.__closure__)

    def dequantize_module_weight(module):
        weight = getattr(module, "weight", None)
        if type(weight) is torch.nn.Parameter and not hasattr(module, "W_q"):
            return weight
        return as_before(module)

    substitute(original)(dequantize_module_weight)
    _PEFT_SUBSTITUTED.append(original)
    return True


_PEFT_INTEGRATIONS = "peft.utils.integrations"
# Every name PEFT's dequantize_module_weight reads (as of PEFT 0.21): HQQ's W_q / dequantize,
# torchao's type check, bitsandbytes' Params4bit / Int8Params. A version that reads any
# other name may dequantize a plain Parameter too, so it is left to Dynamo as it is.
_PEFT_DEQUANTIZE_NAMES = frozenset({
    "Parameter", "Tensor", "TypeError", "__class__", "__module__", "__name__", "dequantize",
    "dequantize_bnb_weight", "device", "getattr", "hasattr", "isinstance", "nn", "startswith", "to",
    "torch", "type", "weight"})


def when_imported(name: str, hook) -> None:
    """Call ``hook(module)`` once module ``name`` is imported: now if it already is, else
    right after its import (importing PEFT on ``import tilepass`` would cost every user a
    second or more, and PEFT is often imported after tilepass). The hook's errors are
    logged, never raised: the module imports as it would without tilepass."""
    if name in sys.modules:
        _run_hook(hook, sys.modules[name])
        return
    sys.meta_path.insert(0, _AfterImport(name, hook))


def _run_hook(hook, module) -> None:
    try:
        hook(module)
    except Exception:
        logging.getLogger(__name__).warning("tilepass: after importing %s", module.__name__, exc_info=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the module's own loader (a per-module ``SourceFileLoader``; any other loader is
    left alone, and then the hook does not run). It stays in ``sys.meta_path`` (only a
    rebinding of the list, never an in-place edit, could be safe under threads) and turns
    itself off once the module has run."""

    def __init__(self, name: str, hook) -> None:
        self.name, self.hook, self.done = name, hook, False

    def find_spec(self, fullname, path, target=None):
        if self.done or fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None  # the other finders answer as before
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            if not self.done:
                self.done = True
                _run_hook(self.hook, module)

        spec.loader.exec_module = exec_then_hook
        return spec
