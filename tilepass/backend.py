"""The Dynamo backend: rewrite the captured graph, then hand it to the downstream compiler."""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import compat, dump, report
from .options import Options
from .passes import PassContext, run_passes

_graph_counter = itertools.count()
_graph_indices: dict[str, int] = {}


def reset_graph_counter() -> None:
    global _graph_counter
    _graph_counter = itertools.count()
    _graph_indices.clear()


def current_compile_id() -> str:
    """Dynamo's id of the graph being compiled ("frame/recompile"), or "" outside Dynamo."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None:
        return ""
    return f"{cid.frame_id}/{cid.frame_compile_id}"


def _graph_index(compile_id: str) -> int:
    """A stable index per compiled graph: a restarted analysis keeps its index."""
    if not compile_id:
        return next(_graph_counter)
    if compile_id not in _graph_indices:
        _graph_indices[compile_id] = next(_graph_counter)
    return _graph_indices[compile_id]


def tilepass_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | Options | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """``torch.compile(model, backend="tilepass", options={...})``.

    ``options`` are validated by :class:`tilepass.Options`; ``mode`` (from
    ``torch.compile(mode=...)``) is passed on to inductor.
    """
    compat.check_supported_torch()
    opts = Options.parse(options, **kwargs)
    compile_id = current_compile_id()
    ctx = PassContext(opts, _graph_index(compile_id))
    root = dump.dump_dir()
    graph_dump = dump.GraphDump(root, compile_id, ctx.graph_index) if root is not None else None
    if graph_dump is not None:
        ctx.on_stage = graph_dump.stage
    run_passes(gm, ctx)
    report.add(ctx.records, compile_id)
    if graph_dump is not None:
        graph_dump.finish(ctx.records, opts, ctx.programs)
    report.logger.info("tilepass: %s", report.summarize(ctx.graph_index, ctx.records))
    return compile_downstream(gm, example_inputs, opts.downstream, mode, ctx.inductor_patches)


def compile_downstream(
    gm: fx.GraphModule, example_inputs: Sequence[Any], downstream: str, mode: str | None, patches: dict | None = None,
) -> Callable[..., Any]:
    if downstream == "eager":
        return gm.forward
    if downstream == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    config = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    config.update(patches or {})
    return compile_fx(gm, example_inputs, config_patches=config or None)


def backend(**options: Any) -> Callable[..., Any]:
    """A configured backend: ``torch.compile(model, backend=tilepass.backend(num_tiles=4))``."""
    opts = Options.parse(options)
    fn = functools.partial(tilepass_backend, options=opts)
    functools.update_wrapper(fn, tilepass_backend)
    return fn
