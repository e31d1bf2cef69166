"""Values that cross into the body of a higher-order op.

Under Dynamo, layer activation checkpointing becomes
``tag_activation_checkpoint(body, *operands)``: the layer is a nested GraphModule whose
placeholders are the operands, in order. transformers builds the attention mask once,
outside the layers, so inside a checkpointed layer the mask SDPA reads is a placeholder.
:class:`BodyInputs` says which outer value a body placeholder is, passes one more outer
value into a body, and drops inputs nothing reads any more, so that the outer
construction they came from becomes dead code.
"""
from __future__ import annotations

import torch.fx as fx

from .fx_utils import op_name, remove_dead_nodes

# Higher-order ops whose operands after the body map 1:1 onto the body's placeholders.
_BODY_FIRST = {"tag_activation_checkpoint", "wrap"}


class BodyInputs:
    def __init__(self, root: fx.GraphModule):
        self.calls: dict[fx.Graph, list[fx.Node]] = {}  # body graph -> the calls that run it
        self.owner: dict[fx.Graph, fx.GraphModule] = {}  # body graph -> the module calling it
        self.unknown: set[fx.Graph] = set()  # bodies reached in a way this class does not model
        for gm in (m for m in root.modules() if isinstance(m, fx.GraphModule)):
            for n in gm.graph.nodes:
                if n.op != "call_function" or op_name(n) not in _BODY_FIRST or not n.args:
                    continue
                attr = n.args[0]
                if not (isinstance(attr, fx.Node) and attr.op == "get_attr"):
                    continue
                body = gm.get_submodule(attr.target)
                if not isinstance(body, fx.GraphModule) or len(n.args) - 1 != len(_placeholders(body.graph)):
                    continue
                if self.owner.setdefault(body.graph, gm) is not gm or any(
                        u.op != "call_function" or op_name(u) not in _BODY_FIRST or u.args[0] is not attr
                        for u in attr.users):
                    self.calls[body.graph] = []  # also used some other way: leave it alone
                    self.unknown.add(body.graph)
                    continue
                if body.graph not in self.unknown:
                    self.calls.setdefault(body.graph, []).append(n)

    def source(self, placeholder: fx.Node) -> fx.Node | None:
        """The outer value a body placeholder is at every call (None: not one value)."""
        calls = self.calls.get(placeholder.graph)
        if placeholder.op != "placeholder" or not calls:
            return None
        i = _placeholders(placeholder.graph).index(placeholder)
        values = {c.args[1 + i] for c in calls}
        value = values.pop() if len(values) == 1 else None
        return value if isinstance(value, fx.Node) else None

    def thread(self, body: fx.Graph, value: fx.Node) -> fx.Node:
        """The node in ``body`` that is ``value`` (from ``body`` or a graph above it),
        adding a placeholder and an operand to every call where needed."""
        if value.graph is body:
            return value
        calls = self.calls.get(body)
        if not calls:
            raise ValueError("a value from outside reaches a graph that is not a known body")
        outer = self.thread(calls[0].graph, value)
        for p in _placeholders(body):
            if self.source(p) is outer:
                return p
        with body.inserting_after(_placeholders(body)[-1]):
            p = body.placeholder(f"{outer.name}_in")
        p.meta.update({k: v for k, v in outer.meta.items() if k in ("example_value", "val", "tensor_dict")})
        for c in calls:
            c.args = c.args + (outer,)
        self._recompile(body)
        return p

    def drop_unused(self, body: fx.Graph, placeholders: list[fx.Node]) -> int:
        """Remove those of ``placeholders`` (of ``body``) that have no users, and their operands."""
        calls = self.calls.get(body)
        if not calls:
            return 0
        dropped = 0
        for p in placeholders:
            if p.users or p.graph is not body:
                continue
            i = _placeholders(body).index(p)
            for c in calls:
                c.args = c.args[: 1 + i] + c.args[2 + i:]
            body.erase_node(p)
            dropped += 1
        if dropped:
            self._recompile(body)
            owner = self.owner[body]
            remove_dead_nodes(owner.graph)
            owner.recompile()
        return dropped

    def _recompile(self, body: fx.Graph) -> None:
        body.owning_module.recompile()
        self.owner[body].recompile()


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]
