"""Close a row-wise region: one token input, no intermediate read outside.

A matcher proposes a seed region (for a dense MLP: the up projections, the ops between
them and the down projection). :func:`close_region` grows it by the one rule every
tiled region obeys:

* **one input**: every token tensor the region reads from outside is one tensor ``x``
  (up to reshapes of its token dims). While there are several, the latest of them (in
  graph order) is taken in, if it is row-wise (:func:`tilepass.rowwise.classify`): a
  LoRA ``lora_A(dropout(x))`` branch next to the base ``linear(x)`` joins the region
  this way, and ``x`` remains.
* **one output**: a value computed inside and read outside is an output. While there
  are several, the earliest reader that is row-wise and reads only the region's values
  (and external tensors) is taken in: a LoRA branch on the down projection, which reads
  the intermediate, joins the region this way, up to the add after the down projection.

What the region reads besides ``x`` is external (weights, biases, feature-wise tensors);
none of it may be computed from the region. Knows nothing of MLPs or of tiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.fx as fx

from . import rowwise
from .fx_utils import arg_nodes, example_value, op_name

# Nodes a closure may take in beyond the seed (a LoRA branch on three projections with
# dropout is ~20); past this the region is not an MLP-sized block.
MAX_ABSORBED = 64


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
    params: list[fx.Node] = []
    for n in nodes:
        reads = [n.args[0]] if rowwise.classify(n, num_tokens).kind == "view" else arg_nodes(n)
        for a in reads:
            if a not in region and a not in inputs and a not in params:
                params.append(a)
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
