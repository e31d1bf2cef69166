"""Graph dumps: what each pass did to each compiled graph, as files a person can read.

The one module of tilepass that writes files. Three ways in, all equivalent:

* ``TILEPASS_DUMP_DIR=dir python train.py``
* ``with tilepass.dump("dir"): ...``
* ``tilepass dump --arch llama --out dir`` (see :mod:`tilepass.cli`)

Per compiled graph, one folder named after Dynamo's compile id (``graph_0_0`` = frame 0,
first compile; no timestamps, so dumps of two runs diff cleanly)::

    graph_0_0/
      stage_00_dynamo.py        the graph Dynamo handed to tilepass, shape-annotated
      stage_01_after_moe.py     after each pass that rewrote something
      stage_02_after_mlp.py
      tile_programs/<key>.py    each region's per-tile program (and each routed mask's mask_mod)
      report.json               every region and every rejected candidate, with reasons
      graph.html                the graph with rewritten regions highlighted and near
                                misses marked with their reason (opens offline)

The same stage graphs and report are emitted as ``TORCH_TRACE`` artifacts, so they show
up in tlparse next to torch's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import os
import pathlib
from typing import Any, Iterator

import torch
import torch.fx as fx

from .fx_utils import example_value, module_stack
from .version import __version__

ENV_VAR = "TILEPASS_DUMP_DIR"
_STACK: list[pathlib.Path] = []

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "tilepass graph report",
    "type": "object",
    "required": ["tilepass", "torch", "compile_id", "graph", "options", "regions", "rejected"],
    "properties": {
        "tilepass": {"type": "string"},
        "torch": {"type": "string"},
        "compile_id": {"type": "string"},
        "graph": {"type": "integer", "minimum": 0},
        "options": {"type": "object"},
        "regions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "pattern", "module", "nodes", "tiles", "tile_tokens", "tokens",
                             "intermediate_bytes", "saved_bytes", "region_key"],
                "if": {"properties": {"kind": {"enum": ["mlp", "moe", "loss"]}}},
                "then": {"properties": {"tiles": {"type": "integer"}, "tile_tokens": {"type": "integer"},
                                        "intermediate_bytes": {"type": "integer"}, "saved_bytes": {"type": "integer"}}},
                "properties": {
                    "kind": {"enum": ["mlp", "moe", "loss", "attention", "checkpoint"]},
                    "pattern": {"type": "string"},
                    "module": {"type": "string"},
                    "nodes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "tiles": {"type": ["integer", "null"], "minimum": 1},
                    "tile_tokens": {"type": ["integer", "null"], "minimum": 1},
                    "tokens": {"type": ["integer", "null"], "minimum": 1},
                    "intermediate_bytes": {"type": ["integer", "null"], "minimum": 0},
                    "saved_bytes": {"type": ["integer", "null"], "minimum": 0},
                    "region_key": {"type": ["string", "null"]},
                    "kernel": {"enum": ["sdpa", "flex", "compiled", None]},  # routed attention's kernel; a compiled loss tile
                    "logits_bytes": {"type": ["integer", "null"], "minimum": 0},  # a loss region's kept logits
                },
            },
        },
        "rejected": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "pattern", "module", "nodes", "reason"],
                "properties": {
                    "kind": {"enum": ["mlp", "moe", "loss", "attention", "checkpoint"]},
                    "reason": {"type": "string", "minLength": 1},
                    "nodes": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def dump_dir() -> pathlib.Path | None:
    """Where dumps go now: the innermost :func:`dump` block, else ``$TILEPASS_DUMP_DIR``."""
    if _STACK:
        return _STACK[-1]
    env = os.environ.get(ENV_VAR)
    return pathlib.Path(env) if env else None


@contextlib.contextmanager
def dump(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Write a dump of every graph tilepass compiles inside the block to ``path``."""
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _STACK.append(root)
    try:
        yield root
    finally:
        _STACK.pop()


def readable(gm: fx.GraphModule) -> str:
    """``print_readable`` code with every value's shape and dtype as an annotation."""
    added = []
    for m in gm.modules():
        if isinstance(m, fx.GraphModule):
            for n in m.graph.nodes:
                if "val" not in n.meta and example_value(n) is not None:
                    n.meta["val"] = example_value(n)
                    added.append(n)
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    finally:
        for n in added:
            del n.meta["val"]


class GraphDump:
    """The dump of one compiled graph; created by the backend when dumping is on."""

    def __init__(self, root: pathlib.Path, compile_id: str, graph_index: int):
        name = f"graph_{compile_id.replace('/', '_')}" if compile_id else f"graph_i{graph_index}"
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.compile_id, self.graph_index = compile_id, graph_index
        self.stages: list[tuple[str, str]] = []
        self.before: list[dict] | None = None  # node table of the Dynamo graph
        for old in self.dir.glob("stage_*.py"):  # a restarted analysis rewrites the folder
            old.unlink()

    def stage(self, name: str, gm: fx.GraphModule) -> None:
        index = len(self.stages)
        text = readable(gm)
        if index == 0:
            self.before = _node_table(gm)
        fname = f"stage_{index:02d}_{name}.py"
        (self.dir / fname).write_text(f"# tilepass dump: {name} (compile id {self.compile_id or '-'})\n{text}\n")
        self.stages.append((name, fname))
        _trace_artifact(f"tilepass_{fname[:-3]}", "string", lambda: text)

    def finish(self, records: list, options: Any, programs: dict[str, str]) -> dict:
        progs = self.dir / "tile_programs"
        for key, code in programs.items():
            progs.mkdir(exist_ok=True)
            (progs / f"{key}.py").write_text(_program_header(key) + code + "\n")
        report = build_report(records, options, self.compile_id, self.graph_index)
        (self.dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (self.dir / "graph.html").write_text(render_html(report, self.before or [], self.stages))
        (self.dir.parent / "report.schema.json").write_text(json.dumps(REPORT_SCHEMA, indent=1) + "\n")
        _trace_artifact("tilepass_report", "json", lambda: json.dumps(report))
        return report


def _program_header(key: str) -> str:
    if key.startswith("mask_"):
        return f"# mask program {key}: fn(b, h, q_idx, kv_idx, *data) -> bool, the flex attention mask_mod\nimport torch\n"
    return f"# tile program {key}: fn(x_tile, *params) -> outputs, run on each tile\nimport torch\n"


def build_report(records: list, options: Any, compile_id: str, graph_index: int) -> dict:
    """The JSON report of one graph (no timings or timestamps: two dumps of one model diff clean)."""
    opts = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})
    regions, rejected = [], []
    for r in records:
        if r.status == "rewritten":
            regions.append({k: getattr(r, k) for k in (
                "kind", "pattern", "module", "nodes", "tiles", "tile_tokens", "tokens",
                "intermediate_bytes", "saved_bytes", "region_key", "kernel", "logits_bytes")})
        else:
            rejected.append({k: getattr(r, k) for k in ("kind", "pattern", "module", "nodes", "reason")})
    return {
        "tilepass": __version__, "torch": torch.__version__, "compile_id": compile_id,
        "graph": graph_index, "options": opts,
        "regions": regions, "rejected": rejected,
    }


def _node_table(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for m_name, m in gm.named_modules():
        if not isinstance(m, fx.GraphModule):
            continue
        for n in m.graph.nodes:
            v = example_value(n)
            shape = f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}" if isinstance(v, torch.Tensor) else ""
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            stack = module_stack(n)
            rows.append({"graph": m_name or "", "name": n.name, "op": n.op, "target": str(target), "shape": shape,
                         "module": stack[-1] if stack else ""})
    return rows


_CSS = """
body{font:13px/1.35 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fff}
header{padding:12px 18px;background:#1f2937;color:#fff} header h1{font-size:17px;margin:0 0 4px}
main{display:flex;gap:18px;padding:14px 18px;align-items:flex-start} #nodes{flex:3;min-width:0}
aside{flex:2;min-width:280px;position:sticky;top:8px}
table{border-collapse:collapse;width:100%;table-layout:fixed} td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap} td.code{font-family:ui-monospace,monospace}
col.n{width:22%} col.o{width:15%} col.v{width:27%} col.m{width:30%} col.r{width:6%}
tr.rewritten{background:#c8f7c5} tr.rewritten td:first-child{border-left:6px solid #1a7f37}
tr.rejected{background:#ffe1b3} tr.rejected td:first-child{border-left:6px solid #d97706}
.card{border-radius:6px;padding:8px 10px;margin:0 0 10px} .card.rewritten{background:#c8f7c5;border:1px solid #1a7f37}
.card.rejected{background:#ffe1b3;border:1px solid #d97706} .card b{font-family:ui-monospace,monospace}
.legend span{display:inline-block;padding:2px 8px;border-radius:4px;margin-right:8px}
.sub{color:#6b7280;font-size:12px}
"""


def render_html(report: dict, nodes: list[dict], stages: list[tuple[str, str]]) -> str:
    """A self-contained page (no network): the Dynamo graph's nodes in order, rewritten
    regions in green, rejected candidates in orange with their reason."""
    mark: dict[str, tuple[str, str]] = {}
    cards = []
    for i, r in enumerate(report["regions"]):
        rid = f"r{i}"
        for n in r["nodes"]:
            if r["kind"] == "checkpoint":
                mark.setdefault(n, ("rewritten", rid))  # its attention node's row stays the attention card's
            else:
                mark[n] = ("rewritten", rid)
        if r["kind"] == "attention":
            detail = (f'routed to flex attention, BlockMask: {html.escape(r["pattern"])}' if r.get("kernel") == "flex"
                      else "routed to SDPA's fused kernels (is_causal)"
                      + (f', one call per group of heads ({r["tiles"]} groups)' if r.get("tiles") else ""))
        elif r["kind"] == "checkpoint":
            detail = ("checkpointed layer: the outputs of SDPA's fused kernels are kept for the backward, "
                      "not recomputed (save_attention)")
        else:
            op = "tiled_loss" if r["kind"] == "loss" else "tiled_forward"
            kept = (f'; the graph still returns {r["logits_bytes"] / 2**20:.2f} MiB of logits (skip_logits=True drops them)'
                    if r.get("logits_bytes") else "")
            detail = (f'{r["tiles"]} tiles × ≤{r["tile_tokens"]} tokens of {r["tokens"]}; '
                      f'≈{r["saved_bytes"] / 2**20:.2f} MiB of activations not kept{kept}<br><span class="sub">{len(r["nodes"])} nodes → '
                      f'tilepass::{op}({html.escape(r["region_key"] or "")})</span>')
        cards.append(
            f'<div class="card rewritten" id="{rid}" data-region="{rid}"><b>{html.escape(r["kind"])}: {html.escape(r["pattern"])}</b><br>'
            f'{html.escape(r["module"] or "<root>")}<br>{detail}</div>'
        )
    for i, r in enumerate(report["rejected"]):
        rid = f"x{i}"
        for n in r["nodes"]:
            mark.setdefault(n, ("rejected", rid))
        cards.append(
            f'<div class="card rejected" id="{rid}" data-rejected="{rid}"><b>{html.escape(r["kind"])}: left as it was</b><br>'
            f'{html.escape(r["module"] or "<root>")}<br>reason: {html.escape(r["reason"])}</div>'
        )
    rows = []
    inputs = sum(1 for n in nodes if n["op"] in ("placeholder", "get_attr"))
    for n in nodes:
        if n["op"] in ("placeholder", "get_attr", "output"):
            continue  # the inputs are summarised above the table
        status, rid = mark.get(n["name"], ("", ""))
        attrs = f' class="{status}" data-region="{rid}"' if status else ""
        where = f'{n["graph"]}.' if n["graph"] else ""
        rows.append(
            f'<tr{attrs}><td class="code" title="{html.escape(where + n["name"])}">{html.escape(where + n["name"])}</td>'
            f'<td class="code">{html.escape(n["target"])}</td><td class="code">{html.escape(n["shape"])}</td>'
            f'<td title="{html.escape(n["module"])}">{html.escape(n["module"])}</td>'
            f'<td>{f"<a href=#{rid}>{rid}</a>" if rid else ""}</td></tr>'
        )
    stage_links = " · ".join(f'<a href="{html.escape(f)}" style="color:#93c5fd">{html.escape(s)}</a>' for s, f in stages)
    kinds = [r["kind"] for r in report["regions"]]
    tiled = sum(k in ("mlp", "moe", "loss") for k in kinds)
    done = f"{tiled} region{'s' if tiled != 1 else ''} tiled"
    if "attention" in kinds:
        done += f", {kinds.count('attention')} attention site{'s' if kinds.count('attention') != 1 else ''} routed"
    if "checkpoint" in kinds:
        done += f", {kinds.count('checkpoint')} layer{'s' if kinds.count('checkpoint') != 1 else ''} keeping attention's outputs"
    left = len(report["rejected"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tilepass graph {html.escape(report['compile_id'])}</title><style>{_CSS}</style></head>
<body><header><h1>tilepass · graph {report['graph']} (compile id {html.escape(report['compile_id'] or '-')})</h1>
<div>{done}, {left} candidate{'s' if left != 1 else ''} left as {'they were' if left != 1 else 'it was'} · torch {html.escape(report['torch'])} · stages: {stage_links}</div></header>
<main><section id="nodes"><div class="legend"><span style="background:#c8f7c5">rewritten region</span><span style="background:#ffe1b3">rejected candidate</span></div>
<p class="sub">{inputs} inputs (parameters, buffers, tensors) not shown; one row per op, in graph order.</p>
<table><colgroup><col class="n"><col class="o"><col class="v"><col class="m"><col class="r"></colgroup>
<thead><tr><th>node</th><th>op</th><th>value</th><th>module</th><th>region</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></section>
<aside>{''.join(cards) or '<p>No candidates in this graph.</p>'}</aside></main></body></html>
"""


def _trace_artifact(name: str, encoding: str, payload) -> None:
    """Emit to TORCH_TRACE (tlparse) when this torch has structured tracing."""
    trace = getattr(getattr(torch, "_logging", None), "trace_structured", None)
    if trace is None:
        return
    try:
        trace("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload)
    except Exception:  # tracing must never break compilation
        pass
