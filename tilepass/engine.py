"""The matching engine: one rule for every row-wise region.

A region is the row-wise closure from one token-major input ``x`` to the values that
leave it, with no intermediate read outside. Its weights are whatever else it reads
(parameters, buffers, feature-wise tensors; none computed from the region); its outputs
are the values it computes that are read outside, returned as the graph has them.

One judge says which ops belong: :class:`tilepass.token_layout.LayoutAnalysis` gives
every value a layout (which rows belong to which token). A dense op is its plain case,
natural rows in and out, decided by :func:`tilepass.rowwise.classify`; an MoE block's
dispatch, sort, grouped matmul and un-sort move rows, and its rules follow them. A dense
MLP's rows never move: its judge is the plain case alone (``Judge(natural=True)``).

A per-kind description (:mod:`tilepass.match_mlp`, :mod:`tilepass.match_moe`) says where
regions start and what it calls them; the engine grows every region by one walk:

1. :func:`sweep` follows everything computed from ``x`` (and from weights) in graph
   order, as far as the judge follows it. An op that also reads other token data (the
   residual stream, a value computed from the region but not in it) is outside; one the
   judge rejects stops the region there, and everything computed from it is outside too.
   A dense MLP's LoRA branches (``lora_A(dropout(x))``) are computed from ``x``, so they
   are in; so are the attention projections of a parallel block, until attention stops it.
2. :func:`cut` keeps what an output needs (an MoE block's last expert output, a dense
   MLP's down projection); the rest runs untiled after it. Where one output is wanted
   (a dense MLP), :func:`one_output` takes in, in graph order, the swept ops that read only
   the region's own values while more than one value leaves it (a LoRA branch on the down
   projection, up to its add).

:func:`external_reads` gives the weights; what the walk did not reach, or what leaves
the region besides its outputs, gives the rejection's reason. Knows nothing of tiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Iterable

import torch
import torch.fx as fx

from . import rowwise
from .fx_utils import arg_nodes, example_value, mutates, op_name, tensor_value
from .layouts import EXT, Ext, NotTokenwise, Tok, Tuple
from .token_layout import LayoutAnalysis

# Ops :func:`one_output` may take in after the cut (a LoRA branch on the down projection
# is ~5); past this the region is not an MLP-sized block.
MAX_ABSORBED = 64


@dataclasses.dataclass
class Rejection:
    """A candidate region that is left as it was, and why."""

    anchor: fx.Node
    reason: str
    module: str
    pattern: str
    nodes: list[fx.Node]


def data_args(node: fx.Node, num_tokens: Any) -> list[fx.Node]:
    """The arguments of a region node that carry token data (not weights or constants)."""
    verdict = rowwise.classify(node, num_tokens)
    if verdict.kind == "matmul":
        return [node.args[verdict.token_arg]]
    if verdict.kind == "view":
        return [node.args[0]]
    return [a for a in arg_nodes(node) if is_token_data(example_value(a), num_tokens)]


def is_token_data(v: Any, num_tokens: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return bool(v) and all(rowwise.is_token_tensor(t, num_tokens) for t in v)
    return isinstance(v, torch.Tensor) and (
        rowwise.is_token_tensor(v, num_tokens) or not rowwise.broadcasts_over_features(v))


def strip_token_views(node: fx.Node, num_tokens: Any) -> fx.Node:
    """Follow ``view``/``reshape`` that only flatten or restore token dims back to their source."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if rowwise.classify(node, num_tokens).kind != "view":
            break
        node = node.args[0]
    return node


_RANDOM = ("dropout", "rand", "randn", "randint", "bernoulli", "multinomial", "normal", "uniform")


def same_value(a: Any, b: Any, depth: int = 32) -> bool:
    """Do two nodes provably compute the same tensor (same deterministic op on same inputs)?"""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or depth == 0:
        return a == b if not isinstance(a, fx.Node) and not isinstance(b, fx.Node) else False
    if a.op != b.op or a.target != b.target or a.op not in ("call_function", "call_method"):
        return False
    if any(r in op_name(a) for r in _RANDOM) or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = list(zip(a.args, b.args)) + [(a.kwargs[k], b.kwargs[k]) for k in a.kwargs]
    return all(same_value(x, y, depth - 1) if isinstance(x, fx.Node) or isinstance(y, fx.Node)
               else (type(x) is type(y) and x == y) for x, y in pairs)


def external_reads(nodes: Iterable[fx.Node], inside: set[fx.Node],
                   reads: Callable[[fx.Node], Iterable[fx.Node]] = arg_nodes) -> list[fx.Node]:
    """What ``nodes`` read from outside ``inside`` (the region's weights), in first-use order."""
    out: list[fx.Node] = []
    for n in nodes:
        for a in reads(n):
            if a not in inside and a not in out:
                out.append(a)
    return out


# -- the judge -----------------------------------------------------------------------------

class Judge(LayoutAnalysis):
    """The one op judge. Its plain case is the dense rule: an op whose token operands all
    have their rows (dim 0) in one layout, and whose other operands are the same for every
    row, is judged by :func:`tilepass.rowwise.classify` over those rows, and its result
    keeps them. Anything else (a dispatch, a sort, a grouped matmul, per-row vectors) goes
    to the layout rules of :class:`~tilepass.token_layout.LayoutAnalysis`. A dropout in
    training is kept either way (its RNG is replayed in the recompute).

    ``natural=True`` (a dense MLP) is the plain case alone, where rows never move: token
    tensors keep all their token dims (``[B, S, F]`` as well as ``[T, F]``, since the tile
    program flattens them)."""

    def __init__(self, num_tokens: Any, natural: bool = False):
        super().__init__(num_tokens)
        self.natural = natural

    def infer(self, node: fx.Node) -> Any:
        if self.natural:
            return self.natural_rows(node)
        plain = self.rowwise(node)
        return plain if plain is not None else super().infer(node)

    def is_row_count_creation(self, node: fx.Node) -> bool:
        return not self.natural and super().is_row_count_creation(node)

    def natural_rows(self, node: fx.Node) -> Any:
        """The layout of ``node`` if the dense rule accepts it on natural rows, else raise why not."""
        verdict = rowwise.classify(node, self.T)
        if not verdict.ok:
            raise NotTokenwise(verdict.reason)
        ins = {a: self.of(a) for a in arg_nodes(node)}
        if not all(_natural(lay) for lay in ins.values()):
            raise NotTokenwise(f"op `{op_name(node)}` reads rows that moved")
        if verdict.kind == "matmul":  # its token operand in the region, every other operand a weight
            x = node.args[verdict.token_arg]
            others = [a for i, a in enumerate(node.args) if i != verdict.token_arg and isinstance(a, fx.Node)]
            if isinstance(ins.get(x, EXT), Ext) or any(not isinstance(ins[a], Ext) for a in others):  # by position: h @ h is no projection
                raise NotTokenwise(f"op `{op_name(node)}` is not a projection of the region's rows by a weight")
        for a, la in ins.items():
            if isinstance(la, Ext) and verdict.kind != "matmul" and not rowwise.broadcasts_over_features(example_value(a)):
                raise NotTokenwise(f"op `{op_name(node)}`: `{a.name}` varies over the tokens and is not in the region")
        return _natural_layout(example_value(node))

    def rowwise(self, node: fx.Node) -> Any:
        """The layout the dense rule gives ``node``, or None where it does not decide."""
        ins = {a: self.of(a) for a in arg_nodes(node)}
        rows = {lay for lay in ins.values() if not isinstance(lay, Ext)}
        if len(rows) != 1 or not isinstance(next(iter(rows)), Tok) or next(iter(rows)).row_dims != 1:
            return None
        (lay,) = rows
        n = self.T * lay.m
        out = example_value(node)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not all(_rows_first(v, n) for v in outs) or not all(
                _rows_first(example_value(a), n) for a, la in ins.items() if la == lay):
            return None
        verdict = rowwise.classify(node, n)
        if not verdict.ok:
            return None
        if verdict.kind == "matmul":  # its one token operand in these rows, every other operand a weight
            others = [a for i, a in enumerate(node.args) if i != verdict.token_arg] + list(node.kwargs.values())
            if self.of(node.args[verdict.token_arg]) != lay or not all(isinstance(self.of(a), Ext) for a in others):
                return None
        elif not all(la == lay or rowwise.broadcasts_over_features(example_value(a)) for a, la in ins.items()):
            return None  # an external tensor that varies over the rows
        return Tuple(tuple(lay for _ in outs)) if isinstance(out, (tuple, list)) else lay


def _rows_first(value: Any, rows: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows


def _natural(layout: Any) -> bool:
    if isinstance(layout, Tuple):
        return all(_natural(item) for item in layout.items)
    return isinstance(layout, Ext) or (isinstance(layout, Tok) and layout.m == 1 and layout.perm is None)


def _natural_layout(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return Tuple(tuple(_natural_layout(v) for v in value))
    return Tok(1, None, max(value.dim() - 1, 1)) if isinstance(value, torch.Tensor) else EXT


# -- the walk: sweep forward from the input, cut back from an output ------------------------

@dataclasses.dataclass
class Swept:
    sources: set[fx.Node]
    nodes: list[fx.Node]  # graph order, without the sources
    inside: set[fx.Node]  # nodes and the sources
    made: set[fx.Node]  # everything computed from the sources (inside or not)
    tainted: set[fx.Node]  # everything computed from the region's own nodes: never one of its weights
    stopped: dict[fx.Node, str]  # ops computed from the region that the judge could not follow, and why
    order: dict[fx.Node, int]


def sweep(graph: fx.Graph, sources: Iterable[fx.Node], analysis: Judge,
          data: Collection[fx.Node] = frozenset()) -> Swept:
    """Everything computed, in graph order, from ``sources`` (the region's input ``x``; a
    dense MLP adds the token views of it its projections read, and a copy of it computed
    twice) and values that are not token data, as far as the judge follows it. An op that
    reads a value computed from the region's nodes but not in it, or one of ``data``
    (values the judge may not take as weights: see :func:`data_dependent`), is outside;
    one the judge rejects stops the region there, and so does everything computed from it.
    A value computed from ``x`` alone outside the region may be a weight (the judge says
    whether it is the same for every row)."""
    sources = set(sources)
    for s in sources:
        analysis.layouts[s] = Tok(1, None, tensor_value(s).dim() - 1)
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes: list[fx.Node] = []
    inside, made, tainted = set(sources), set(sources), set()
    stopped: dict[fx.Node, str] = {}
    start = min(order[s] for s in sources)
    reach = max((order[u] for s in sources for u in s.users), default=start)  # the last reader of the region
    for n in graph.nodes:
        if order[n] > reach and analysis.natural:
            break  # nothing later reads the region (an MoE sweep goes on: it takes in row counts)
        if order[n] <= start or n in sources or n.op not in ("call_function", "call_method") or _shape_query(n):
            continue
        args = list(arg_nodes(n))
        if not any(a in made for a in args):
            if analysis.is_row_count_creation(n):
                # arange(T*k) for an inverse permutation: its size is the token count, so
                # it belongs to the tile (and is re-sized there).
                analysis.layouts[n] = analysis.infer(n)
                nodes.append(n)
                inside.add(n)
                made.add(n)
            continue
        made.add(n)
        if any(a in tainted or (a in inside and a not in sources) for a in args):
            tainted.add(n)
        if not any(a in inside for a in args) or any(a not in inside and (a in tainted or a in data) for a in args):
            continue  # reads no row of the region, or other token data: outside it
        try:
            analysis.layouts[n] = analysis.infer(n)
        except NotTokenwise as e:
            stopped[n] = str(e)
            continue
        nodes.append(n)
        inside.add(n)
        reach = max([reach, *(order[u] for u in n.users)])
    return Swept(sources, nodes, inside, made, tainted, stopped, order)


def _shape_query(node: fx.Node) -> bool:
    """``x.size(d)``: the shape of a token tensor, not its data (a dense view reads it)."""
    return op_name(node) in ("size", "sym_size", "dim")


@dataclasses.dataclass
class Cut:
    nodes: list[fx.Node]  # graph order, without the sources
    inside: set[fx.Node]  # nodes and the sources
    outputs: list[fx.Node]  # the values read outside, graph order: returned as the graph has them
    params: list[fx.Node]  # whatever else it reads (its weights), first-use order


def cut(swept: Swept, output: fx.Node, reads: Callable[[fx.Node], Iterable[fx.Node]] = arg_nodes) -> Cut:
    """The swept region cut to what ``output`` needs; the rest runs untiled after it.
    ``reads`` says which arguments of a node it reads (a dense token view: its input only)."""
    keep = needed(output, swept.inside)
    nodes = [n for n in swept.nodes if n in keep]
    inside = set(nodes) | swept.sources
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return Cut(nodes, inside, outputs, external_reads(nodes, inside, reads))


def one_output(swept: Swept, output: fx.Node, what: str,
               reads: Callable[[fx.Node], Iterable[fx.Node]] = arg_nodes) -> Cut | str:
    """The region cut to ``output``, with one value leaving it: while several do, the next
    swept op (graph order) that reads only the region's own values is taken in (a LoRA
    branch on the down projection reads the intermediate: the region grows to its add,
    which becomes the output); else why not."""
    region = set(cut(swept, output, reads).nodes)
    leaving = {n for n in region if any(u not in region for u in n.users)}
    budget = MAX_ABSORBED
    for n in swept.nodes:
        if len(leaving) <= 1 or budget <= 0:
            break
        ins = [a for a in arg_nodes(n) if a in swept.inside]
        if n in region or not ins or not all(a in region for a in ins):
            continue
        region.add(n)
        budget -= 1
        leaving = {a for a in leaving | {n} if any(u not in region for u in a.users)}
    if len(leaving) > 1:
        return read_outside(leaving - {output}, region, swept.order, what)
    nodes = [n for n in swept.nodes if n in region]
    inside = region | swept.sources
    return Cut(nodes, inside, [n for n in nodes if n in leaving] or [output], external_reads(nodes, inside, reads))


def read_outside(leaving: Iterable[fx.Node], region: set[fx.Node], order: dict[fx.Node, int], what: str) -> str:
    """The reason for the first of ``leaving`` (values of ``region`` read outside it)."""
    n = min(leaving, key=order.__getitem__)
    reader = min((u for u in n.users if u not in region), key=order.__getitem__)
    return (f"`{n.name}` ({op_name(n)}) inside {what} is also read outside it (by `{reader.name}`), "
            "so it would have to be kept whole")


def data_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from graph inputs that are not parameters or buffers."""
    data: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if not _is_param_placeholder(n):
                data.add(n)
        elif any(a in data for a in arg_nodes(n)):
            data.add(n)
    return data


def _is_param_placeholder(node: fx.Node) -> bool:
    v = example_value(node)
    return isinstance(v, torch.nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name


def needed(node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    """What ``node`` needs inside ``region``: its inputs, recursively, and every in-place
    op that wrote one of them (its result may be unused, its effect is not)."""
    writers: dict[fx.Node, list[fx.Node]] = {}
    for n in region:
        if mutates(n) and n.args and isinstance(n.args[0], fx.Node):
            writers.setdefault(n.args[0], []).append(n)
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out or n not in region:
            continue
        out.add(n)
        stack.extend(arg_nodes(n))
        stack.extend(writers.get(n, ()))
    return out
