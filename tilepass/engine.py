"""The matching engine: one rule for every row-wise region.

A region is the row-wise closure from one token-major input ``x`` to the values that
leave it, with no intermediate read outside. Its weights are whatever else it reads
(parameters, buffers, feature-wise tensors; none computed from the region); its outputs
are the values it computes that are read outside, returned as the graph has them.

One judge says which ops belong: :class:`tilepass.token_layout.LayoutAnalysis` gives
every value a layout (which rows belong to which token). A dense op is its plain case,
natural rows in and out, decided by :func:`tilepass.rowwise.classify`; an MoE block's
dispatch, sort, grouped matmul and un-sort move rows, and its rules follow them.

A per-kind description (:mod:`tilepass.match_mlp`, :mod:`tilepass.match_moe`) says where
regions start and what it calls them; the engine grows them, in one of two ways:

* :func:`close_region` grows a seed (a dense MLP: its projections and the ops between
  them) to the closure: while the region reads several token tensors, the latest of them
  is taken in if row-wise (a LoRA ``lora_A(dropout(x))`` next to ``linear(x)``); while
  several values leave it, the earliest reader that reads only the region is taken in
  (a LoRA branch on the down projection, up to its add).
* :func:`sweep` follows everything computed from ``x`` and weights alone, in graph order,
  up to the first op the judge cannot follow (an MoE block, whose router, dispatch and
  experts are not one chain); :func:`cut` then keeps what an output needs.

Either way :func:`external_reads` gives the weights, and the rejection says why not.
Knows nothing of tiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from . import rowwise
from .fx_utils import arg_nodes, example_value, mutates, op_name, tensor_value
from .layouts import Ext, NotTokenwise, Tok, Tuple
from .token_layout import LayoutAnalysis

# Nodes a closure may take in beyond the seed (a LoRA branch on three projections with
# dropout is ~20); past this the region is not an MLP-sized block.
MAX_ABSORBED = 64


@dataclasses.dataclass
class Rejection:
    """A candidate region that is left as it was, and why."""

    anchor: fx.Node
    reason: str
    module: str
    pattern: str
    nodes: list[fx.Node]


@dataclasses.dataclass
class Closed:
    nodes: list[fx.Node]  # graph order
    source: fx.Node  # the one token tensor the region reads (before token reshapes)
    token_inputs: set[fx.Node]  # the nodes through which it reads it (source, or views of it)
    output: fx.Node
    params: list[fx.Node]  # everything else it reads, in first-use order


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


def close_region(seed: Iterable[fx.Node], output: fx.Node, num_tokens: Any, what: str = "the region") -> Closed | str:
    """Grow ``seed`` (whose main output is ``output``) into a closed region, or say why not."""
    graph = output.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    region = set(seed)
    budget = MAX_ABSORBED

    # One input.
    while True:
        inputs = _inputs(region, num_tokens)
        sources = {strip_token_views(a, num_tokens) for a in inputs}
        if not sources:
            return f"{what} reads no token tensor"
        first = min(sources, key=order.__getitem__)
        if len(sources) == 1 or all(same_value(s, first) for s in sources):
            break
        latest = max(sources, key=order.__getitem__)
        if budget <= 0 or not _absorbable(latest, region, num_tokens, need_inside=False):
            names = ", ".join(sorted(f"`{s.name}`" for s in sources))
            return f"the up projections read different inputs ({names})"
        for a in inputs:  # the views of it the region reads come in with it
            if strip_token_views(a, num_tokens) is latest:
                while a is not latest:
                    region.add(a)
                    a = a.args[0]
        region.add(latest)
        budget -= 1

    # One output.
    while True:
        outs = [n for n in region if any(u not in region for u in n.users)]
        if len(outs) <= 1:
            break
        readers = sorted({u for n in outs for u in n.users if u not in region}, key=order.__getitem__)
        taken = next((r for r in readers if _absorbable(r, region, num_tokens, need_inside=True)), None)
        if taken is None or budget <= 0:
            n = min((o for o in outs if o is not output), key=order.__getitem__)
            reader = min((u for u in n.users if u not in region), key=order.__getitem__)
            return (f"`{n.name}` ({op_name(n)}) inside {what} is also read outside it (by `{reader.name}`), "
                    "so it would have to be kept whole")
        region.add(taken)
        budget -= 1

    nodes = sorted(region, key=order.__getitem__)
    outs = [n for n in nodes if any(u not in region for u in n.users)]
    output = outs[0] if outs else output
    inputs = _inputs(region, num_tokens)
    source = min({strip_token_views(a, num_tokens) for a in inputs}, key=order.__getitem__)
    params = external_reads(nodes, region | inputs, lambda n: (
        [n.args[0]] if rowwise.classify(n, num_tokens).kind == "view" else arg_nodes(n)))
    made = _descendants(nodes, order)
    for a in list(inputs) + params:
        if a in made:
            return f"`{a.name}` is computed from {what} and read back into it"
    return Closed(nodes, source, inputs, output, params)


def _inputs(region: set[fx.Node], num_tokens: Any) -> set[fx.Node]:
    return {a for n in region for a in data_args(n, num_tokens) if a not in region}


def _absorbable(node: fx.Node, region: set[fx.Node], num_tokens: Any, need_inside: bool) -> bool:
    """May ``node`` join the region? It must act row-wise, and (read forward) every token
    tensor it reads must already be inside; a projection's weight never is."""
    if node.op not in ("call_function", "call_method") or node.is_impure() or rowwise.mixes_activations(node):
        return False
    verdict = rowwise.classify(node, num_tokens)
    if not verdict.ok:
        return False
    if verdict.kind == "matmul" and any(a in region for a in arg_nodes(node) if a is not node.args[verdict.token_arg]):
        return False
    if not need_inside:
        return True
    return all(a in region for a in data_args(node, num_tokens))


def _descendants(nodes: list[fx.Node], order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes outside ``nodes`` computed from them, up to the last of them."""
    inside, made = set(nodes), set(nodes)
    last = order[nodes[-1]]
    n = nodes[0]
    while n is not None and order.get(n, last + 1) <= last:
        if n not in inside and any(a in made for a in arg_nodes(n)):
            made.add(n)
        n = n.next if n.next.op != "root" else None
    return made - inside


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
    to the layout rules of :class:`~tilepass.token_layout.LayoutAnalysis`."""

    def infer(self, node: fx.Node) -> Any:
        plain = self.rowwise(node)
        return plain if plain is not None else super().infer(node)

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


# -- the forward sweep ---------------------------------------------------------------------

@dataclasses.dataclass
class Swept:
    nodes: list[fx.Node]  # graph order, without the source
    inside: set[fx.Node]  # nodes and the source
    stopped: dict[fx.Node, str]  # ops computed from the region that the judge could not follow, and why


def sweep(graph: fx.Graph, source: fx.Node, analysis: LayoutAnalysis, data: set[fx.Node]) -> Swept:
    """Everything computed, in graph order, from ``source`` and values that are not token
    data (``data``: see :func:`data_dependent`), as far as the judge follows it. An op that
    reads other token data is outside; one the judge rejects stops the sweep there, and
    so does everything computed from it."""
    analysis.layouts[source] = Tok(1, None, tensor_value(source).dim() - 1)
    nodes: list[fx.Node] = []
    inside = {source}
    stopped: dict[fx.Node, str] = {}
    started = False
    for n in graph.nodes:
        if n is source:
            started = True
            continue
        if not started or n.op not in ("call_function", "call_method"):
            continue
        args = list(arg_nodes(n))
        if not any(a in inside or a in stopped for a in args):
            if analysis.is_row_count_creation(n):
                # arange(T*k) for an inverse permutation: its size is the token count, so
                # it belongs to the tile (and is re-sized there).
                analysis.layouts[n] = analysis.infer(n)
                nodes.append(n)
                inside.add(n)
            continue
        foreign = [a for a in args if a in data and a not in inside]
        if foreign or any(a in stopped for a in args):
            if any(a in inside for a in args) and not foreign:
                stopped[n] = next(stopped[a] for a in args if a in stopped)
            continue  # reads other token data: outside the region
        try:
            analysis.layouts[n] = analysis.infer(n)
        except NotTokenwise as e:
            stopped[n] = str(e)
            continue
        nodes.append(n)
        inside.add(n)
    return Swept(nodes, inside, stopped)


@dataclasses.dataclass
class Cut:
    nodes: list[fx.Node]  # graph order, without the source
    inside: set[fx.Node]  # nodes and the source
    outputs: list[fx.Node]  # the values read outside, graph order: returned as the graph has them
    params: list[fx.Node]  # whatever else it reads (its weights), first-use order


def cut(swept: Swept, source: fx.Node, output: fx.Node) -> Cut:
    """The swept region cut to what ``output`` needs; the rest runs untiled after it."""
    keep = needed(output, swept.inside)
    nodes = [n for n in swept.nodes if n in keep]
    inside = set(nodes) | {source}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return Cut(nodes, inside, outputs, external_reads(nodes, inside))


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
