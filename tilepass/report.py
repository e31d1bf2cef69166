"""What the backend did: one record per candidate region, since the last reset."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger("tilepass")


@dataclasses.dataclass
class Record:
    status: str  # "rewritten" | "rejected"
    kind: str  # "mlp", "moe", "loss", "attention", "checkpoint"
    module: str  # dotted module path, e.g. "model.layers.0.mlp"
    pattern: str  # "swiglu", "geglu", "fused_gate_up_swiglu", "mlp_gelu_tanh", ...
    graph: int  # index of the compiled graph (in compile order since the last reset)
    compile_id: str = ""  # Dynamo's compile id of that graph, e.g. "0/0" (frame/recompile)
    tiles: int | None = None  # tiles at the traced token count (rewritten only); attention: head groups
    tile_tokens: int | None = None  # tokens in the largest tile
    tokens: int | None = None  # tokens the region saw when traced
    reason: str | None = None  # why it was rejected
    nodes: list[str] = dataclasses.field(default_factory=list)
    region_key: str | None = None
    # routed attention: "sdpa" (is_causal, fused kernels) or "flex"; a loss region whose
    # tiles run compiled (option loss_kernel): "compiled"
    kernel: str | None = None
    # Bytes of the region's intermediates over the whole sequence, and the estimated
    # activation bytes tiling saves (intermediates minus one tile's worth).
    intermediate_bytes: int | None = None
    saved_bytes: int | None = None
    # A loss region: bytes of the logits the graph still returns ([tokens, vocab] in the
    # model's dtype; 0 when skip_logits dropped them).
    logits_bytes: int | None = None

    @property
    def shown_pattern(self) -> str:
        """The pattern as people read it: a routed site also says where it runs ("... -> sdpa")."""
        return f"{self.pattern} -> {self.kernel}" if self.kernel else self.pattern

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_RECORDS: list[Record] = []


def add(records: list[Record], compile_id: str = "") -> None:
    """Add one graph's records. Dynamo may restart an analysis and call the backend again
    for the same compile id; the later attempt's records replace the earlier ones."""
    if compile_id:
        _RECORDS[:] = [r for r in _RECORDS if r.compile_id != compile_id]
    for r in records:
        r.compile_id = compile_id
    _RECORDS.extend(records)


def records() -> list[Record]:
    return list(_RECORDS)


def clear() -> None:
    _RECORDS.clear()


def summarize(graph_index: int, records: list[Record]) -> str:
    done = [r for r in records if r.status == "rewritten"]
    rejected = [r for r in records if r.status == "rejected"]
    parts = [f"graph {graph_index}: rewrote {len(done)} region{'s' if len(done) != 1 else ''}"]
    if done:
        parts.append(", ".join(f"{r.module or '<root>'} [{r.kind}:{r.shown_pattern}"
                               f"{f', {r.tiles} {_tiles_word(r)}' if r.tiles is not None else ''}{', ' + logits_note(r) if r.logits_bytes else ''}]" for r in done))
    if rejected:
        parts.append(
            f"left {len(rejected)}: " + "; ".join(f"{r.module or '<root>'}: {r.reason}" for r in rejected)
        )
    return " | ".join(parts)


def _tiles_word(r: Record) -> str:
    return "head groups" if r.kind == "attention" else "tiles"


def logits_note(r: Record) -> str:
    """What a loss region's kept logits cost ("" when none are kept)."""
    if not r.logits_bytes:
        return ""
    return f"keeps {_size(r.logits_bytes)} of logits (skip_logits=True drops them)"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
