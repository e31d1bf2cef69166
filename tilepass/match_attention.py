"""Find attention sites: SDPA calls and transformers' eager softmax form.

Each site's mask is lifted into a pointwise mask program (:mod:`tilepass.mask_program`);
anything else (an additive float mask that is not a lifted boolean one, dropout, a mask
read from a graph input) is left on SDPA with the reason. Knows nothing of flex's
runtime; only judges.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import common_module, example_value, op_name
from .mask_program import MaskProgram, NotPointwise, Resolve, lift_mask, resolved


@dataclasses.dataclass
class AttentionSite:
    node: fx.Node  # the scaled_dot_product_attention call (or the eager form's last matmul)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    enable_gqa: bool
    causal: bool
    mask: MaskProgram | None
    module: str
    pattern: str
    softcap: float | None = None  # tanh(score / c) * c before the mask (Gemma 2)
    replaced: tuple = ()  # eager form: the nodes between q/k/v and the output
    sinks: fx.Node | None = None  # [H] extra logit per head, normalised with the keys then dropped (GPT-OSS)


@dataclasses.dataclass
class AttentionRejection:
    node: fx.Node
    reason: str
    module: str
    pattern: str = "sdpa"


def find_attention(graph: fx.Graph, resolve: Resolve | None = None) -> tuple[list[AttentionSite], list[AttentionRejection]]:
    """Every attention site of ``graph`` that flex attention can express, and the rest
    with reasons. ``resolve``: see :func:`lift_mask`."""
    sites, rejections = [], []
    for n in graph.nodes:
        eager = _eager_attention(n, resolve)
        if isinstance(eager, AttentionSite):
            sites.append(eager)
            continue
        if isinstance(eager, AttentionRejection):
            rejections.append(eager)
            continue
        if not (n.op == "call_function" and n.target is F.scaled_dot_product_attention):
            continue
        module = common_module([n])
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        kw = dict(zip(names, n.args), **n.kwargs)
        q, k, v = kw["query"], kw["key"], kw["value"]
        reason = None
        if kw.get("dropout_p", 0.0) not in (0, 0.0):
            reason = f"attention dropout p={kw['dropout_p']}: flex attention has no dropout"
        elif any(not isinstance(example_value(t), torch.Tensor) or example_value(t).dim() != 4 for t in (q, k, v)):
            reason = "query/key/value are not [B, H, S, D] tensors"
        mask = None
        causal = bool(kw.get("is_causal", False))
        if reason is None and kw.get("attn_mask") is not None:
            if causal:
                reason = "both a mask and is_causal"
            else:
                try:
                    mask = lift_mask(kw["attn_mask"], resolve)
                except NotPointwise as e:
                    reason = str(e)
        reason = reason or _broadcast_reason(mask, q, k)
        if reason is not None:
            rejections.append(AttentionRejection(n, reason, module))
            continue
        pattern = "causal" if causal else ("full" if mask is None else "mask(" + ",".join(sorted(mask.uses)) + ")")
        (k0, k_rep), (v0, v_rep) = _unrepeat_kv(k), _unrepeat_kv(v)
        if k_rep and v_rep:  # repeat_kv'd: flex reads the shared kv heads itself (GQA)
            k, v = k0, v0
        sites.append(AttentionSite(n, q, k, v, kw.get("scale"), bool(kw.get("enable_gqa", False)) or (k_rep and v_rep),
                                   causal, mask, module, pattern))
    return sites, rejections


_MIN_MASK_VALUE = -1e30  # "masked" in an additive mask: exp(score + this) is 0 in fp32/bf16


def _broadcast_reason(mask: MaskProgram | None, q: fx.Node, k: fx.Node) -> str | None:
    """Why the lifted program would not hold at every (b, h, q, kv) of this attention: an
    index it uses came from a shorter arange, whose mask broadcasts (one row for all)."""
    if mask is None:
        return None
    qv, kv = example_value(q), example_value(k)
    dims = mask.broadcast_dims(dict(b=qv.shape[0], h=qv.shape[1], q_idx=qv.shape[2], kv_idx=kv.shape[2]))
    return (f"the mask's {', '.join(dims)} positions come from a shorter arange than the attention's length "
            "(the dense mask broadcasts)") if dims else None


def _is_call(n: Any, *names: str) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and op_name(n) in names


def _unrepeat_kv(n: fx.Node) -> tuple[fx.Node, bool]:
    """k from transformers' ``repeat_kv(k)`` (getitem None -> expand -> reshape): (k, repeated)."""
    if _is_call(n, "reshape") and _is_call(n.args[0], "expand") and n.args[0].args[0].target is operator.getitem:
        g = n.args[0].args[0]
        idx = g.args[1]
        if isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None and all(i == slice(None) for i in idx[:2] + idx[3:]):
            return g.args[0], True
    return n, False


def _const(n: Any) -> float | None:
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def _eager_attention(out: fx.Node, resolve: Resolve | None):
    """Match ``matmul(dropout(softmax(scores).to(dtype)), v)`` back to ``q @ k^T``."""
    if not _is_call(out, "matmul") or len(out.args) != 2:
        return None
    p, vr = out.args
    chain = [out]
    while _is_call(p, "dropout", "to", "float", "type"):
        if op_name(p) == "dropout":
            prob = p.kwargs.get("p", p.args[1] if len(p.args) > 1 else 0.5)
            training = p.kwargs.get("training", p.args[2] if len(p.args) > 2 else True)
            if training and prob:
                return AttentionRejection(out, f"attention dropout p={prob}: flex attention has no dropout",
                                          common_module([out]), "eager")
        chain.append(p)
        p = p.args[0]
    module = common_module([out])
    sinks = None
    if p.target is operator.getitem and _is_call(p.args[0], "softmax") and isinstance(p.args[1], tuple) \
            and p.args[1][-1] == slice(None, -1):
        found = _sinks(p.args[0])
        if isinstance(found, str):
            return AttentionRejection(out, found, module, "eager")
        sinks, s, sink_nodes = found
        chain += [p, *sink_nodes]
    elif not _is_call(p, "softmax") or _softmax_dim(p) not in (-1, 3):
        return None
    else:
        chain.append(p)
        s = p.args[0]
    mask = None
    if _is_call(s, "add") and len(s.args) == 2 and isinstance(s.args[1], fx.Node):
        chain.append(s)
        s, additive = s.args
        try:
            mask = _lift_additive(additive, resolve)
        except NotPointwise as e:
            return AttentionRejection(out, str(e), module, "eager")
    softcap = None
    if _is_call(s, "mul") and _is_call(s.args[0], "tanh") and _is_call(s.args[0].args[0], "truediv"):
        c1, c2 = _const(s.args[1]), _const(s.args[0].args[0].args[1])
        if c1 is not None and c1 == c2:
            chain += [s, s.args[0], s.args[0].args[0]]
            softcap, s = c1, s.args[0].args[0].args[0]
    scale = 1.0
    if _is_call(s, "mul") and _const(s.args[1]) is not None:
        chain.append(s)
        scale, s = _const(s.args[1]), s.args[0]
    if not (_is_call(s, "matmul") and len(s.args) == 2 and _is_call(s.args[1], "transpose")):
        return None
    t = s.args[1]
    if sorted(d % 4 for d in t.args[1:3]) != [2, 3]:
        return None
    chain += [s, t]
    q = s.args[0]
    k, k_rep = _unrepeat_kv(t.args[0])
    v, v_rep = _unrepeat_kv(vr)
    if k_rep != v_rep:  # only one side repeated: keep both as they are
        k, v, k_rep, v_rep = t.args[0], vr, False, False
    values = [example_value(x) for x in (q, k, v)]
    if any(not isinstance(x, torch.Tensor) or x.dim() != 4 for x in values):
        return None
    broadcast = _broadcast_reason(mask, q, k)
    if broadcast:
        return AttentionRejection(out, broadcast, module, "eager")
    inner = set(chain[1:])
    if any(u not in inner and u is not out for n in chain[1:] for u in n.users):
        return AttentionRejection(out, "the attention weights are also read elsewhere (output_attentions)", module, "eager")
    pattern = "eager" + ("+sinks" if sinks is not None else "") + (f"+softcap({softcap:g})" if softcap else "") + (
        "+mask(" + ",".join(sorted(mask.uses)) + ")" if mask else "")
    return AttentionSite(out, q, k, v, scale, k_rep or v_rep or values[0].shape[1] != values[1].shape[1],
                         False, mask, module, pattern, softcap, tuple(chain), sinks)


def _softmax_dim(n: fx.Node) -> Any:
    return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)


def _sinks(softmax: fx.Node):
    """GPT-OSS sinks: ``softmax(cat([scores, sinks.reshape(1, H, 1, 1).expand(...)], -1)
    [- max])[..., :-1]``: one extra logit per head joins the normalisation and is dropped.
    Returns (the [H] sinks, the scores, the nodes that go) or a reason."""
    if _softmax_dim(softmax) not in (-1, 3):
        return "attention sinks: the softmax is not over the keys"
    nodes = [softmax]
    x = softmax.args[0]
    if _is_call(x, "sub") and isinstance(x.args[1], fx.Node) and x.args[1].target is operator.getitem \
            and _is_call(x.args[1].args[0], "max") and x.args[1].args[0].args[0] is x.args[0]:
        mx = x.args[1].args[0]
        dim = mx.kwargs.get("dim", mx.args[1] if len(mx.args) > 1 else None)
        keepdim = mx.kwargs.get("keepdim", mx.args[2] if len(mx.args) > 2 else False)
        if x.args[1].args[1] != 0 or dim not in (-1, 3) or keepdim is not True:
            return "attention sinks: the logits are shifted by something other than their row max"
        nodes += [x, x.args[1], mx]  # minus the row max: softmax is shift-invariant
        x = x.args[0]
    cat_dim = x.kwargs.get("dim", x.args[1] if len(x.args) > 1 else 0) if _is_call(x, "cat") else None
    if cat_dim not in (-1, 3) or len(x.args[0]) != 2:
        return "attention sinks: the extra logit is not concatenated as one key column"
    scores, column = x.args[0]
    nodes.append(x)
    if not (_is_call(column, "expand") and _is_call(column.args[0], "reshape", "view")):
        return "attention sinks: the extra logit is not one value per head, broadcast"
    sinks = column.args[0].args[0]
    shape = tuple(column.args[0].args[1:]) if not isinstance(column.args[0].args[1], (tuple, list)) else tuple(column.args[0].args[1])
    value, heads = example_value(sinks), example_value(scores)
    if shape not in ((1, -1, 1, 1),) or not isinstance(value, torch.Tensor) or value.dim() != 1 \
            or value.shape[0] != heads.shape[1]:
        return "attention sinks: the extra logit is not one value per head, broadcast"
    nodes += [column, column.args[0]]
    return sinks, scores, nodes


def _lift_additive(mask: fx.Node, resolve: Resolve | None) -> MaskProgram:
    """An additive mask ``where(allowed, 0, min)`` (maybe sliced to the key length) as a
    boolean mask program."""
    m = mask
    m = resolved(m, resolve)  # built outside a checkpointed layer
    while m.target is operator.getitem and isinstance(m.args[1], tuple) and all(isinstance(i, slice) for i in m.args[1]):
        if any(i.start not in (None, 0) or i.step not in (None, 1) for i in m.args[1]):
            raise NotPointwise("the additive mask is read from an offset slice")
        m = m.args[0]  # mask[:, :, :, :kv_len]: a prefix, the same values where they are read
    if not (_is_call(m, "where") and len(m.args) == 3):
        raise NotPointwise("the additive mask is not built as where(allowed, 0, min)")
    cond, zero, low = m.args
    zero_ok = (isinstance(zero, (int, float)) and zero == 0) or (
        isinstance(zero, fx.Node) and _is_call(zero, "zeros") and zero.args in (((),), ())) or (
        isinstance(zero, fx.Node) and _is_call(zero, "tensor") and _const(zero.args[0] if zero.args else None) == 0)
    if not zero_ok or _const(low) is None or _const(low) > _MIN_MASK_VALUE:
        raise NotPointwise("the additive mask is an arbitrary float tensor")
    if example_value(m) is not None and tuple(example_value(m).shape[-1:]) != tuple(example_value(mask).shape[-1:]):
        raise NotPointwise("the additive mask is sliced to fewer keys than it was built for")
    return lift_mask(cond, resolve)
