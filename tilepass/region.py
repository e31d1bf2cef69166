"""Turn a matched region into a tile program: a small GraphModule ``fn(x_tile, *params)``.

Inside the program every token tensor is 2-D ``[tile_tokens, features]``: the region's
input arrives flattened, reshapes that only flatten or restore token dims become no-ops,
ops that name a feature dim name it as ``-1``, and feature-wise external tensors
(``[1, 1, F]``) are flattened to ``[F]`` so that they broadcast against 2-D tiles.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import rowwise
from .fx_utils import example_value, tensor_value


def build_tile_program(
    nodes: Sequence[fx.Node],
    token_inputs: set[fx.Node],
    params: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    num_tokens: Any,
) -> fx.GraphModule:
    """Copy ``nodes`` (in graph order) into a standalone 2-D tile program.

    ``token_inputs`` are the nodes through which the region reads its input ``x`` (they
    all become the program's first placeholder); ``params`` become the others.
    """
    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, Any] = {t: x for t in token_inputs}
    for i, p in enumerate(params):
        ph = graph.placeholder(f"p{i}")
        pv = tensor_value(p)
        env[p] = ph
        if pv is not None and pv.dim() >= 2 and rowwise.broadcasts_over_features(pv):
            env[p] = ("flatten_on_use", ph)  # feature-wise [1, 1, F] tensor
    flattened: dict[fx.Node, fx.Node] = {}

    def lookup(a: Any, for_matmul_weight: bool = False) -> Any:
        if not isinstance(a, fx.Node):
            return a
        v = env[a]
        if isinstance(v, tuple) and v and v[0] == "flatten_on_use":
            if for_matmul_weight:
                return v[1]
            if v[1] not in flattened:
                flattened[v[1]] = graph.call_method("reshape", (v[1], -1))
            return flattened[v[1]]
        return v

    for n in nodes:
        verdict = rowwise.classify(n, num_tokens)
        if verdict.kind in ("view", "identity"):
            env[n] = lookup(n.args[0])
            continue
        args = list(n.args)
        kwargs = dict(n.kwargs)
        if verdict.kind == "matmul":
            mapped_args = [lookup(a, for_matmul_weight=(i != verdict.token_arg)) for i, a in enumerate(args)]
            mapped_kwargs = {k: lookup(v, for_matmul_weight=True) for k, v in kwargs.items()}
        else:
            if verdict.kind == "lastdim":
                pos, name = verdict.dim_arg
                if name in kwargs:
                    kwargs[name] = -1
                elif len(args) > pos:
                    args[pos] = -1
            if verdict.kind == "getitem" and isinstance(example_value(n.args[0]), torch.Tensor):
                args[1] = (Ellipsis, args[1][-1] if isinstance(args[1], tuple) else args[1])
            mapped_args = [fx.node.map_arg(a, lambda m: lookup(m)) if not isinstance(a, fx.Node) else lookup(a) for a in args]
            mapped_kwargs = {k: (lookup(v) if isinstance(v, fx.Node) else v) for k, v in kwargs.items()}
        env[n] = graph.create_node(n.op, n.target, tuple(mapped_args), mapped_kwargs, name=n.name)
    graph.output(tuple(lookup(o) for o in outputs))
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="TileProgram")


def program_key(kind: str, program: fx.GraphModule, extra: Any) -> str:
    """A content hash: equal keys mean equal computations (shared across layers)."""
    digest = hashlib.sha1((program.code + repr(extra)).encode()).hexdigest()[:16]
    return f"{kind}_{digest}"



def build_layout_program(
    nodes: Sequence[fx.Node],
    source: fx.Node,
    params: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    layouts: dict,
) -> fx.GraphModule:
    """Copy an MoE region (judged by :mod:`tilepass.token_layout`) into a tile program.

    Rows stay in dim 0; what depended on the traced token count is re-expressed per
    tile: reshapes give ``-1`` rows, ``arange(T*m)`` becomes ``arange(rows(x)*m)``, and a
    ``[batch, seq, F]`` tensor is ``[rows, F]``.
    """
    from .token_layout import Arange, Tok, is_view

    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, Any] = {source: x}
    for i, p in enumerate(params):
        env[p] = graph.placeholder(f"p{i}")
    rows = graph.call_method("size", (x, 0))

    def mapped(a):
        return fx.node.map_arg(a, lambda m: env[m])

    for n in nodes:
        lay = layouts.get(n)
        out = example_value(n)
        if is_view(n) and isinstance(lay, Tok):
            features = tuple(out.shape[lay.row_dims:])
            env[n] = graph.call_method("reshape", (env[n.args[0]], (-1, *features)))
            continue
        if isinstance(lay, Arange):
            count = rows if lay.m == 1 else graph.call_function(operator.mul, (rows, lay.m))
            env[n] = graph.create_node(n.op, n.target, (count,), mapped(dict(n.kwargs)), name=n.name)
            continue
        env[n] = graph.create_node(n.op, n.target, mapped(tuple(n.args)), mapped(dict(n.kwargs)), name=n.name)
    results = []
    for o in outputs:
        lay, out = layouts[o], example_value(o)
        node = env[o]
        if lay.row_dims != 1:
            node = graph.call_method("reshape", (node, (-1, *out.shape[lay.row_dims:])))
        results.append(node)
    graph.output(tuple(results))
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="TileProgram")


def build_loss_program(
    chain: Sequence[fx.Node],
    source: fx.Node,
    params: Sequence[fx.Node],
    num_tokens: Any,
    loss_fn: Any,
    loss_kwargs: dict,
) -> fx.GraphModule:
    """A tile program ``fn(x, target, *params) -> (loss,)`` for an LM head + loss: the
    ``chain`` (projection, then row-wise ops) copied as :func:`build_tile_program` does,
    then ``loss_fn(logits, target, **loss_kwargs)`` on the tile."""
    program = build_tile_program(chain, {source}, params, [chain[-1]], num_tokens)
    graph = program.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[0]):
        target = graph.placeholder("target")
    output = next(n for n in graph.nodes if n.op == "output")
    (logits,) = output.args[0]
    with graph.inserting_before(output):
        loss = graph.call_function(loss_fn, (logits, target), dict(loss_kwargs))
    output.args = ((loss,),)
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="LossTileProgram")
