"""What every pass shares: its context, its signature, and the cleanup after a rewrite."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx

from .fx_utils import hint, remove_dead_nodes
from .options import Options, default_num_tiles
from .report import Record


@dataclasses.dataclass
class PassContext:
    options: Options
    graph_index: int
    records: list[Record] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    programs: dict[str, str] = dataclasses.field(default_factory=dict)  # region key -> tile program code
    on_stage: Callable[[str, fx.GraphModule], None] | None = None  # called with the graph after each pass
    inductor_patches: dict = dataclasses.field(default_factory=dict)  # config the downstream compile needs
    root: fx.GraphModule | None = None  # the graph Dynamo captured (passes also see its nested bodies)
    # What one pass works out once for all the graphs it visits (e.g. the order of the
    # checkpointed layers); cleared before each pass, since passes rewrite the graphs.
    memo: dict = dataclasses.field(default_factory=dict)


Pass = Callable[[fx.GraphModule, PassContext], int]


def resolve_tiles(options: Options, num_tokens: int, in_features: int, intermediate: int,
                  default=default_num_tiles) -> tuple[int, int]:
    """(num_tiles, tile_tokens) for the tiled op: exactly one of them is non-zero."""
    if options.tile_tokens is not None:
        return 0, options.tile_tokens
    if options.num_tiles is not None:
        return options.num_tiles, 0
    return default(num_tokens, in_features, intermediate), 0


def nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return hint(t.numel()) * t.element_size()


def cleanup(gm: fx.GraphModule, rewrites: int) -> int:
    if rewrites:
        remove_dead_nodes(gm.graph)  # the replaced regions (and a routed dense mask) go
        gm.graph.lint()
        gm.recompile()
    return rewrites
