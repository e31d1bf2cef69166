"""Find the LM head + cross-entropy of a causal-LM loss in a Dynamo graph, from the graph alone.

The rule: a ``cross_entropy`` whose input is computed, through ops that act on each token
alone (casts, views that flatten tokens, a final-logit softcap ``/c, tanh, *c``, a logit
scale), from a projection ``x @ W`` (+ bias) of one token tensor ``x``::

    x ─ linear ─ (softcap, scale, .float(), view(-1, V)...) ─ cross_entropy(., target) ─> loss

Then the loss is a sum over tokens of a function of one row of ``x`` and its target, and
can be computed tile by tile. transformers' ``ForCausalLMLoss`` (label shift by ``pad`` and
a slice, or ``shift_labels`` given; ``reduction="mean"``, or ``"sum"`` then
``/ num_items_in_batch``) and a hand-written ``F.cross_entropy(lm_head(h).float().view(-1, V),
labels.view(-1))`` both have this form: the target's own computation stays outside.

Every ``cross_entropy`` in the graph is a candidate: one that does not fit is returned as a
:class:`LossRejection` with the reason. This module knows nothing of tiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx
import torch.nn.functional as F

from . import rowwise
from .fx_utils import common_module, example_value, leading_numel, op_name, tensor_value

_MAX_CHAIN = 32  # ops between the projection and the loss; more is not an LM head
# F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
_CE_PARAMS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
_CE_DEFAULTS = dict(weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean", label_smoothing=0.0)


@dataclasses.dataclass
class LossMatch:
    loss: fx.Node  # the cross_entropy call
    head: fx.Node  # the projection (lm_head)
    source: fx.Node  # the token tensor the projection reads
    target: fx.Node  # the class index per row of the loss input
    chain: list[fx.Node]  # head, then every op up to the loss input, in graph order
    params: list[fx.Node]  # what the chain reads besides the source: weight, bias, scales
    reduction: str  # "mean" or "sum"
    ignore_index: int
    label_smoothing: float
    pattern: str
    module: str
    num_tokens: Any
    in_features: int
    vocab: int

    @property
    def nodes(self) -> list[fx.Node]:
        return [*self.chain, self.loss]

    @property
    def loss_input(self) -> fx.Node:
        return self.chain[-1]

    def read_outside(self) -> list[fx.Node]:
        """Chain nodes that something besides the loss reads: the logits the model returns."""
        inside = set(self.nodes)
        return [n for n in self.chain if any(u not in inside for u in n.users)]


@dataclasses.dataclass
class LossRejection:
    node: fx.Node
    reason: str
    module: str
    pattern: str
    nodes: list[fx.Node]


def is_cross_entropy(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.cross_entropy


def cross_entropy_args(node: fx.Node) -> dict[str, Any]:
    """Every argument of an ``F.cross_entropy`` call by name, defaults filled in."""
    args = dict(_CE_DEFAULTS)
    args.update(zip(_CE_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _unsupported_arguments(args: dict[str, Any]) -> str | None:
    if args["weight"] is not None:
        return "the loss has class weights (the mean would be weighted): not tiled"
    if args["size_average"] is not None or args["reduce"] is not None:
        return "the loss uses the legacy size_average/reduce arguments: not tiled"
    if args["reduction"] not in ("mean", "sum"):
        return f"reduction={args['reduction']!r} returns one loss per token: only 'mean' and 'sum' are tiled"
    if not isinstance(args["ignore_index"], int):
        return "ignore_index is a value of the graph, not a constant"
    if not isinstance(args["label_smoothing"], (int, float)) or isinstance(args["label_smoothing"], bool):
        return "label_smoothing is a value of the graph, not a constant"
    return None


def _walk_to_head(start: fx.Node, num_tokens: Any) -> tuple[fx.Node, list[fx.Node]] | str:
    """(projection, ops after it in walk order) from the loss input back, or why not."""
    chain: list[fx.Node] = []
    node = start
    while len(chain) < _MAX_CHAIN:
        if node.op in ("placeholder", "get_attr"):
            return (f"the logits `{node.name}` are an input of this graph: the LM head runs in another graph "
                    "(a graph break between it and the loss), so the loss cannot be tiled with it; "
                    "TORCH_LOGS=graph_breaks shows where the graph breaks")
        if rowwise.projection_input(node, num_tokens) is not None:
            return node, chain
        verdict = rowwise.classify(node, num_tokens)
        if not verdict.ok:
            return f"between the LM head and the loss: {verdict.reason}"
        if verdict.kind not in ("elementwise", "view", "identity", "getitem"):
            return f"between the LM head and the loss: op `{op_name(node)}` ({verdict.kind}) is not tiled in a loss region"
        tokens = [a for a in node.all_input_nodes if rowwise.is_token_tensor(example_value(a), num_tokens)]
        if len(tokens) != 1:
            names = ", ".join(f"`{a.name}`" for a in tokens) or "none"
            return f"op `{node.name}` between the LM head and the loss reads {len(tokens)} token tensors ({names})"
        chain.append(node)
        node = tokens[0]
    return f"more than {_MAX_CHAIN} ops between the loss and any projection: not an LM head"


def _pattern(chain: list[fx.Node], args: dict[str, Any]) -> str:
    names = {op_name(n) for n in chain}
    softcap = "softcap_" if "tanh" in names else ""
    smoothed = "_smoothed" if args["label_smoothing"] else ""
    return f"{softcap}cross_entropy_{args['reduction']}{smoothed}"


def _external_inputs(chain: list[fx.Node], source: fx.Node) -> list[fx.Node]:
    inside = set(chain)
    params: list[fx.Node] = []
    for n in chain:
        for a in n.all_input_nodes:
            if a not in inside and a is not source and a not in params:
                params.append(a)
    return params


def find_losses(graph: fx.Graph) -> tuple[list[LossMatch], list[LossRejection]]:
    """Every cross-entropy loss: those that can be tiled with their LM head, and the rest with a reason."""
    matches: list[LossMatch] = []
    rejections: list[LossRejection] = []
    for node in graph.nodes:
        if not is_cross_entropy(node):
            continue
        args = cross_entropy_args(node)
        module = common_module([node])

        def reject(reason: str, nodes=(node,), pattern="cross_entropy"):
            rejections.append(LossRejection(node, reason, module, pattern, list(nodes)))

        reason = _unsupported_arguments(args)
        logits, target = args["input"], args["target"]
        lv, tv = tensor_value(logits), tensor_value(target)
        if reason is None and (lv is None or lv.dim() != 2):
            reason = "the loss input is not [tokens, classes] (classes on another dim): not tiled"
        if reason is None and (tv is None or tv.dim() != 1 or tv.is_floating_point()):
            reason = "the targets are not one class index per row (class probabilities?): not tiled"
        if reason is not None:
            reject(reason)
            continue
        num_tokens = lv.shape[0]
        walked = _walk_to_head(logits, num_tokens)
        if isinstance(walked, str):
            reject(walked)
            continue
        head, after = walked
        chain = [head, *reversed(after)]
        source = rowwise.projection_input(head, num_tokens)
        sv = tensor_value(source)
        module = common_module([head]) or module
        pattern = _pattern(chain, args)
        if sv is None or sv.dim() < 2 or leading_numel(sv) is None:
            reject("the LM head's input is not a token tensor", [*chain, node], pattern)
            continue
        matches.append(LossMatch(
            loss=node, head=head, source=source, target=target, chain=chain,
            params=_external_inputs(chain, source), reduction=args["reduction"],
            ignore_index=args["ignore_index"], label_smoothing=float(args["label_smoothing"]),
            pattern=pattern, module=module, num_tokens=num_tokens,
            in_features=int(sv.shape[-1]), vocab=int(lv.shape[-1]),
        ))
    return matches, rejections
