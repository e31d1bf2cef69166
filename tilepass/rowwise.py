"""The dense rule, the plain case of the engine's judge (:class:`tilepass.engine.Judge`):
which ops act on each token independently.

A region can be tiled along tokens exactly when every op in it computes output row ``i``
from input row ``i`` alone. Tensors inside a region are *token tensors*
(``[*tokens, features]``, the features on the last dim). Everything else a region reads
is *external*: weights, biases, scalars, and tensors that broadcast over the features
only (``[F]``, ``[1, 1, F]``).

:func:`classify` names what an op is (``matmul``, ``elementwise``, ``lastdim``, ``view``,
``identity``) or gives the reason it is not row-wise. It reads only the node and the
fake values Dynamo recorded; it knows nothing of tiling.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import example_value, known_equal, leading_numel, mutates, op_name, tensor_value

# Ops that act on each element (given token operands of one shape and external operands
# that broadcast over the features only).
ELEMENTWISE_FUNCTIONS = {
    torch.tanh, torch.sigmoid, torch.exp, torch.erf, torch.neg, torch.abs, torch.sqrt,
    torch.rsqrt, torch.relu, torch.square, torch.sin, torch.cos, torch.log,
    torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.maximum, torch.minimum,
    torch.clamp, torch.clip, torch.where, torch.masked_fill,
    torch.ge, torch.gt, torch.le, torch.lt, torch.eq, torch.ne, torch.logical_and, torch.logical_or, torch.logical_not,
    operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne, operator.and_, operator.or_, operator.invert,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    operator.imul, operator.iadd, operator.isub, operator.itruediv,
    F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.mish, F.softplus, F.hardswish,
    F.hardsigmoid, F.elu, F.selu, F.celu, F.sigmoid, F.tanh, F.hardtanh,
}
ELEMENTWISE_METHODS = {
    "tanh", "sigmoid", "exp", "erf", "neg", "abs", "sqrt", "rsqrt", "relu", "square", "sin",
    "cos", "log", "mul", "add", "sub", "div", "pow", "clamp", "clamp_min", "clamp_max", "clip",
    "float", "double", "half", "bfloat16", "int", "long", "bool", "to", "type", "contiguous",
    "ge", "gt", "le", "lt", "eq", "ne", "masked_fill", "logical_and", "logical_or", "logical_not", "__and__", "__or__",
}
# Nonlinearities: a chain of projections is an MLP only if one of these sits between them.
ACTIVATIONS = {
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu", F.silu: "silu",
    F.gelu: "gelu", F.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.mish: "mish",
    F.softplus: "softplus", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.elu: "elu",
    F.selu: "selu", F.celu: "celu", F.sigmoid: "sigmoid", F.tanh: "tanh", torch.erf: "erf",
}
ACTIVATION_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu", "erf": "erf"}

MATMUL_FUNCTIONS = {F.linear, torch.addmm, torch.matmul, torch.mm, operator.matmul}
MATMUL_METHODS = {"matmul", "mm"}

VIEW_FUNCTIONS = {torch.reshape, torch.flatten}
VIEW_METHODS = {"view", "reshape", "flatten"}

# op -> (position of the dim argument in node.args, its default); x is args[0] for both
# torch.chunk(x, n, dim) and x.chunk(n, dim), so one position serves both spellings.
LASTDIM_FUNCTIONS = {torch.chunk: (2, 0), torch.split: (2, 0), F.softmax: (1, None),
                     F.log_softmax: (1, None), torch.softmax: (1, None), torch.log_softmax: (1, None)}
LASTDIM_METHODS = {"chunk": (2, 0), "split": (2, 0), "softmax": (1, None), "log_softmax": (1, None)}
# Reductions are row-wise over the features only when they keep the dim.
REDUCTION_FUNCTIONS = {torch.sum: "sum", torch.mean: "mean", torch.amax: "amax", torch.amin: "amin"}
REDUCTION_METHODS = {"sum", "mean", "amax", "amin"}

DROPOUT_FUNCTIONS = {F.dropout}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What an op is, for the region builder; ``reason`` is set when it is not row-wise."""

    kind: str  # matmul | elementwise | random | lastdim | view | identity | getitem | rejected
    reason: str | None = None
    token_arg: int | None = None  # for matmul: index of the token operand in args
    dim_arg: tuple[int, str] | None = None  # for lastdim: (position, kwarg name) of the dim

    @property
    def ok(self) -> bool:
        return self.reason is None


def is_token_tensor(value: Any, num_tokens: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and known_equal(leading_numel(value), num_tokens)


def broadcasts_over_features(value: Any) -> bool:
    """Scalars, ``[F]`` and ``[1, ..., 1, F]`` tensors: the same for every token."""
    if not isinstance(value, torch.Tensor):
        return True
    return all(known_equal(s, 1) for s in value.shape[:-1])


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )


def matmul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """(token operand, weight) of a projection ``x @ W``-like node, else None."""
    if not is_matmul(node):
        return None
    args = node.args
    if node.target is torch.addmm:
        if len(args) < 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return args[1], args[2]
    if node.target is F.linear:
        if len(args) < 2:
            return None
        return args[0], args[1]
    if len(args) != 2 or node.kwargs:
        return None
    return args[0], args[1]


def projection_input(node: fx.Node, num_tokens: Any) -> fx.Node | None:
    """The token operand of a projection ``x @ W`` by a 2-D ``W``, else None."""
    ops = matmul_operands(node)
    if ops is None:
        return None
    x, w = ops
    wv = tensor_value(w)
    if not isinstance(x, fx.Node) or wv is None or wv.dim() != 2:
        return None
    # No shape test on the weight: [tokens, F] and [out, in] can coincide. Tiling the rows
    # of x is exact whatever the weight is, as long as it is computed outside the region,
    # and the walk in match_mlp never follows a weight into the region.
    if not is_token_tensor(example_value(x), num_tokens):
        return None
    return x


_ATTENTION_LIKE = {torch.bmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention}


def mixes_activations(node: fx.Node) -> bool:
    """A product of two data-dependent tensors (``q @ k^T``, ``attn @ v``, SDPA): the
    signature of attention. A walk that meets one is not inside an MLP."""
    if node.op == "call_function" and node.target in _ATTENTION_LIKE:
        return True
    if not is_matmul(node):
        return False
    ops = matmul_operands(node)
    return ops is None or tensor_value(ops[1]) is None or tensor_value(ops[1]).dim() != 2


def activation_name(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in ACTIVATIONS:
        name = ACTIVATIONS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        return name
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return ACTIVATION_METHODS[node.target]
    return None


def _is_last_dim(dim: Any, ndim: int) -> bool:
    return isinstance(dim, int) and (dim == -1 or dim == ndim - 1)


def _tensor_operands(node: fx.Node) -> list[tuple[Any, Any]]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append((a, example_value(a)))
    return out


def draws_random(node: fx.Node) -> bool:
    """Does ``node`` draw random numbers when it runs (dropout in training)?"""
    if not ((node.op == "call_function" and node.target in DROPOUT_FUNCTIONS)
            or (node.op == "call_method" and op_name(node) == "dropout")):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return bool(training) and p != 0


def classify(node: fx.Node, num_tokens: Any) -> Verdict:
    """Is ``node`` row-wise on token tensors of ``num_tokens`` rows? (see module doc)"""
    name = op_name(node)
    if node.op not in ("call_function", "call_method"):
        return Verdict("rejected", f"`{node.name}` ({node.op}) is not an op")
    if mutates(node) or node.kwargs.get("inplace"):
        return Verdict("rejected", f"op `{name}` works in place")
    out = example_value(node)
    target = node.target

    if is_matmul(node):
        x = projection_input(node, num_tokens)
        if x is None:
            return Verdict("rejected", f"op `{name}` is not a projection of tokens by a weight")
        return Verdict("matmul", token_arg=list(node.args).index(x))

    if target is operator.getitem:
        src, idx = node.args
        src_val = example_value(src)
        if isinstance(src_val, (tuple, list)):
            return Verdict("getitem") if isinstance(idx, int) else Verdict("rejected", "getitem on a tuple with a non-int index")
        if isinstance(src_val, torch.Tensor):
            return _classify_tensor_index(node, src_val, idx, num_tokens)
        return Verdict("rejected", f"getitem on a {type(src_val).__name__}")

    if (node.op == "call_function" and target in DROPOUT_FUNCTIONS) or (node.op == "call_method" and name == "dropout"):
        if node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False):
            return Verdict("rejected", "in-place dropout")
        if draws_random(node):
            return Verdict("random")  # kept; the tiled runtime replays its RNG in the recompute
        return Verdict("identity")

    if (node.op == "call_function" and target in VIEW_FUNCTIONS) or (node.op == "call_method" and name in VIEW_METHODS):
        src = node.args[0]
        sv = example_value(src)
        if is_token_tensor(sv, num_tokens) and is_token_tensor(out, num_tokens) and known_equal(sv.shape[-1], out.shape[-1]):
            return Verdict("view")
        return Verdict("rejected", f"op `{name}` reshapes across the feature dim")

    if (node.op == "call_function" and target in LASTDIM_FUNCTIONS) or (node.op == "call_method" and name in LASTDIM_METHODS):
        pos, default = LASTDIM_FUNCTIONS[target] if node.op == "call_function" else LASTDIM_METHODS[name]
        src_val = example_value(node.args[0])
        dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else default)
        if not isinstance(src_val, torch.Tensor) or not _is_last_dim(dim, src_val.dim()):
            return Verdict("rejected", f"op `{name}` over dim {dim} mixes tokens")
        return Verdict("lastdim", dim_arg=(pos, "dim"))

    if (node.op == "call_function" and target in REDUCTION_FUNCTIONS) or (node.op == "call_method" and name in REDUCTION_METHODS):
        pos = 1  # both torch.sum(x, dim) and x.sum(dim) keep x in args[0]
        src_val = example_value(node.args[0])
        dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else None)
        keep = node.kwargs.get("keepdim", node.args[pos + 1] if len(node.args) > pos + 1 else False)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if not isinstance(src_val, torch.Tensor) or not _is_last_dim(dim, src_val.dim()):
            return Verdict("rejected", f"op `{name}` over dim {dim} mixes tokens")
        if not keep:
            return Verdict("rejected", f"op `{name}` drops the feature dim (keepdim=False)")
        return Verdict("lastdim", dim_arg=(pos, "dim"))

    if (node.op == "call_function" and target in ELEMENTWISE_FUNCTIONS) or (node.op == "call_method" and name in ELEMENTWISE_METHODS):
        if not is_token_tensor(out, num_tokens):
            return Verdict("rejected", f"op `{name}` does not keep the token layout")
        if name == "to":
            src_val = example_value(node.args[0])
            if isinstance(src_val, torch.Tensor) and src_val.device != out.device:
                return Verdict("rejected", "op `to` moves the tensor to another device")
        for arg, val in _tensor_operands(node):
            if not isinstance(val, torch.Tensor):
                continue
            if is_token_tensor(val, num_tokens):
                if tuple(val.shape) != tuple(out.shape):
                    return Verdict("rejected", f"op `{name}` broadcasts `{arg.name}` over the tokens")
            elif not broadcasts_over_features(val):
                return Verdict("rejected", f"op `{name}`: operand `{arg.name}` {tuple(val.shape)} varies over part of the token dims")
        return Verdict("elementwise")

    mixes = _token_mixing_reason(node, name)
    if name == "autograd_function_apply":  # Dynamo's form of a custom torch.autograd.Function (Bloom's GeLU)
        return Verdict("rejected", "a custom torch.autograd.Function (`autograd_function_apply`) is not known to act "
                                   "row-wise on tokens: its backward is the model's own code")
    return Verdict("rejected", mixes or f"op `{name}` is not known to act row-wise on tokens")


def _classify_tensor_index(node: fx.Node, src_val: torch.Tensor, idx: Any, num_tokens: Any) -> Verdict:
    """``x[..., a:b:c]`` (or the same with explicit full slices) indexes features only."""
    if not is_token_tensor(src_val, num_tokens):
        return Verdict("rejected", "indexing a tensor that is not a token tensor")
    items = idx if isinstance(idx, tuple) else (idx,)
    if len(items) == 2 and items[0] is Ellipsis and isinstance(items[1], slice):
        return Verdict("getitem")
    if len(items) == src_val.dim() and all(s == slice(None) for s in items[:-1]) and isinstance(items[-1], slice):
        return Verdict("getitem")
    return Verdict("rejected", f"indexing `{idx}` selects tokens, not features")


def _token_mixing_reason(node: fx.Node, name: str) -> str | None:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if isinstance(dim, int):
        return f"op `{name}` over dim {dim} mixes tokens"
    return None
