"""Splice a tiled region into a graph: flatten x, call the tiled op, restore shapes."""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from . import runtime
from .fx_utils import tensor_value


def splice_tiled_region(
    graph: fx.Graph,
    key: str,
    source: fx.Node,
    params: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    num_tiles: int,
    tile_tokens: int,
    first_region_node: fx.Node,
) -> fx.Node:
    """Replace every use of ``outputs`` with the tiled op's results; returns the op node.

    The region's nodes become dead and are removed by the caller's dead-code pass.
    """
    src = tensor_value(source)
    # Right before the region's first node: every user of an output comes later. Inputs
    # computed later than that (e.g. ``w.transpose(-2, -1)`` of an expert weight, which
    # Dynamo records where the module used it) are moved up; they read weights only.
    first = first_region_node
    hoist_before(graph, first, [source, *params])
    with graph.inserting_before(first):
        x2d = graph.call_method("reshape", (source, -1, src.shape[-1]))
        call = graph.call_function(
            runtime.tiled_forward._opoverload, (key, x2d, list(params), num_tiles, tile_tokens)
        )
    # Annotate the new nodes like Dynamo's own (value, module), for later passes and dumps.
    meta = {k: first.meta[k] for k in ("nn_module_stack",) if k in first.meta}
    x2d.meta.update(meta, example_value=src.reshape(-1, src.shape[-1]))
    rows = x2d.meta["example_value"].shape[0]
    call.meta.update(meta, example_value=[
        src.new_empty((rows, *spec.feature_shape), dtype=spec.dtype) for spec in runtime.registered_region(key).outputs
    ])
    cursor = call
    for i, out in enumerate(outputs):
        ov = tensor_value(out)
        with graph.inserting_after(cursor):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta.update(meta, example_value=call.meta["example_value"][i])
        cursor = item
        if ov.dim() != 2:
            lead = _leading_shape(graph, item, source, ov)
            with graph.inserting_after(cursor):
                cursor = graph.call_method("reshape", (item, *lead, ov.shape[-1]))
            cursor.meta.update(meta, example_value=ov)
        out.replace_all_uses_with(cursor)
    return call


def hoist_before(graph: fx.Graph, point: fx.Node, nodes: Sequence[fx.Node]) -> None:
    """Move ``nodes`` (and what they read) that come after ``point`` to just before it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    limit = order[point]
    move: set[fx.Node] = set()
    stack = [n for n in nodes if order[n] > limit]
    while stack:
        n = stack.pop()
        if n in move or order[n] <= limit:
            continue
        if n.op == "placeholder" or n.is_impure():
            raise RuntimeError(f"tilepass: cannot move `{n.name}` before the tiled region")
        move.add(n)
        stack.extend(a for a in n.all_input_nodes)
    for n in sorted(move, key=order.__getitem__):
        point.prepend(n)


def _leading_shape(graph: fx.Graph, after: fx.Node, source: fx.Node, out: torch.Tensor) -> list:
    """The output's token dims: literal ints, or ``source.size(d)`` where symbolic."""
    lead = []
    for d, s in enumerate(out.shape[:-1]):
        if isinstance(s, int):
            lead.append(s)
        else:
            with graph.inserting_before(after):
                lead.append(graph.call_method("size", (source, d)))
    return lead
