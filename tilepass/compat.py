"""Every torch-version and torch-internals dependency of tilepass, in one place.

Other modules ask this one a question ("can flex attention run a backward here?",
"give me a context where autograd records inside a custom op") instead of reading
``torch.__version__`` themselves, so that each branch can be unit-tested by
monkeypatching :data:`TORCH_VERSION`.
"""
from __future__ import annotations

import contextlib
import re
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
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return False
    import logging

    import transformers.utils.logging  # noqa: F401  (it defines Logger.warning_once)

    function = getattr(logging.Logger, "warning_once", None)
    config = torch._dynamo.config if config is None else config
    ignored = getattr(config, "ignore_logging_functions", None)
    if ignored is None:
        ignored = getattr(config, "ignore_logger_methods", None)
    if function is None or ignored is None:
        return False
    ignored.add(function)
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
