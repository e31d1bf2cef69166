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
) -> fx.Node:
    """Replace every use of ``outputs`` with the tiled op's results; returns the op node.

    The region's nodes become dead and are removed by the caller's dead-code pass.
    """
    src = tensor_value(source)
    # Right after the last input is defined: every input exists there, and every user of
    # every output comes later (outputs depend on the inputs).
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max([source, *params], key=order.__getitem__)
    if last.op == "placeholder":  # keep the placeholders together at the top
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        x2d = graph.call_method("reshape", (source, -1, src.shape[-1]))
    with graph.inserting_after(x2d):
        call = graph.call_function(
            runtime.tiled_forward._opoverload, (key, x2d, list(params), num_tiles, tile_tokens)
        )
    cursor = call
    for i, out in enumerate(outputs):
        ov = tensor_value(out)
        with graph.inserting_after(cursor):
            item = graph.call_function(operator.getitem, (call, i))
        cursor = item
        if ov.dim() != 2:
            lead = _leading_shape(graph, item, source, ov)
            with graph.inserting_after(cursor):
                cursor = graph.call_method("reshape", (item, *lead, ov.shape[-1]))
        out.replace_all_uses_with(cursor)
    return call


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
