"""``save_attention``: a checkpointed layer keeps its attention outputs for the backward."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import tilepass
from tilepass import checkpoint_policy, passes
from tilepass.report import summarize
from tilepass.options import Options, OptionsError
from tilepass.tiny_models import tiny_model

from conftest import assert_close_results, checkpointed_llama_step, rejected, rewritten, train_step
from test_attention import _causal_attention


def _attention_forwards(fn, *args) -> tuple[int, int]:
    """(attention forward kernels, attention backward kernels) one forward+backward ran:
    what the compiled step does after AOTAutograd's partitioner and inductor."""
    with torch.profiler.profile() as prof:
        out = fn(*args)
        (out.float() ** 2).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    fwd = sum(c for k, c in counts.items() if "scaled_dot_product" in k and "backward" not in k and k.startswith("aten::_"))
    bwd = sum(c for k, c in counts.items() if "scaled_dot_product" in k and k.endswith("_backward"))
    return fwd, bwd


@pytest.mark.parametrize("eager_form", [False, True])
def test_saved_attention_trains_exactly_and_runs_attention_once(eager_form):
    """Float64 on CPU, inside a checkpointed block: outputs and every gradient equal eager at
    1e-10 (uneven length, batch 2, non-uniform upstream gradient); plain checkpointing runs
    the attention forward twice (forward, recompute), save_attention once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    attn = _causal_attention(eager_form)().double()

    def f(x):
        return checkpoint(attn, x, use_reentrant=False)

    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 37, 32, dtype=torch.float64)
    out = f(x)
    want = (out, torch.autograd.grad((out * w).sum(), [x, *attn.parameters()]))
    forwards = {}
    for save in (False, True):
        torch._dynamo.reset()
        tilepass.reset()
        compiled = torch.compile(f, backend="tilepass", options=dict(save_attention=save))
        out = compiled(x)
        got = (out, torch.autograd.grad((out * w).sum(), [x, *attn.parameters()]))
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        forwards[save] = _attention_forwards(compiled, x)
        assert len(rewritten("checkpoint")) == int(save)
    assert forwards == {False: (2, 1), True: (1, 1)}


def test_saved_attention_in_a_checkpointed_llama():
    """The benchmark's setting: a transformers Llama with layer checkpointing. Every layer
    gets the policy, the step matches the one without it (same graph, another partition)
    and eager, and each layer's attention forward runs once."""
    model, inputs, weights = checkpointed_llama_step()
    want = train_step(model, inputs, weights)
    results, forwards = {}, {}
    for save in (False, True):
        torch._dynamo.reset()
        tilepass.reset()
        compiled = torch.compile(model, backend="tilepass", options=dict(num_tiles=3, save_attention=save))
        ops = _GraphOps()  # the graphs inductor compiles for this step: no attention forward left in the backward
        with torch._inductor.config.patch(post_grad_custom_post_pass=ops, fx_graph_cache=False):
            results[save] = train_step(model, inputs, weights, call=compiled)
        assert ops.forwards_in_backward_graphs() == ((2, 0) if save else (4, 2)), ops.attention_ops()
        # the same compiled step again (the same call, no recompile), under the profiler
        forwards[save] = _attention_forwards(lambda: compiled(**inputs).logits)
        model.zero_grad(set_to_none=True)
    assert [(_layer(r.module), r.pattern) for r in rewritten("checkpoint")] == [
        ("layers.0", "save_attention"), ("layers.1", "save_attention")]
    assert [r.kernel for r in rewritten("attention")] == ["sdpa", "sdpa"] and len(rewritten("mlp")) == 2
    # named as in Dynamo's graph, like the attention rows: the dump page marks those nodes
    assert [r.nodes for r in rewritten("checkpoint")] == [r.nodes for r in rewritten("attention")]
    assert_close_results(results[True], results[False], rtol=1e-10, atol=1e-10, what="saved vs recomputed")
    assert_close_results(results[True], want, rtol=1e-4, atol=1e-5, what="saved vs eager")  # float32 RoPE
    assert forwards == {False: (4, 2), True: (2, 2)}


def _captured_llama_graph(padded: bool = False):
    """The graph Dynamo hands the backend for a checkpointed tiny Llama (not yet rewritten)."""
    model = tiny_model("llama", attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    torch.compile(model, backend=keep)(input_ids=ids, **({"attention_mask": mask} if padded else {}))
    [gm] = [g for g in graphs if len(list(g.modules())) > 1]  # the one holding the layers
    return gm


def test_a_layer_with_a_user_policy_is_left_as_set():
    gm = _captured_llama_graph()
    bodies = [m for m in gm.modules() if isinstance(m, fx.GraphModule) and m is not gm]
    user_policy = object()
    bodies[0].meta[checkpoint_policy.CONTEXT_FN_KEY] = user_policy
    ctx = passes.PassContext(Options.parse(dict(save_attention=True)), 0)
    passes.run_passes(gm, ctx)
    assert bodies[0].meta[checkpoint_policy.CONTEXT_FN_KEY] is user_policy
    assert bodies[1].meta[checkpoint_policy.CONTEXT_FN_KEY].func is torch.utils.checkpoint.create_selective_checkpoint_contexts
    saved = [r for r in ctx.records if r.kind == "checkpoint"]
    assert [(r.status, _layer(r.module)) for r in saved] == [("rejected", "layers.0"), ("rewritten", "layers.1")]
    assert saved[0].reason == "this checkpointed layer already has a policy (a context_fn): left as set"
    line = summarize(0, ctx.records)  # the log line names what each rewrite was
    assert "layers.1 [checkpoint:save_attention]" in line and "layers.0.mlp [mlp:swiglu, " in line
    assert "layers.0.self_attn [attention:mask(kv_idx,q_idx) -> sdpa]" in line and "None" not in line


def test_save_attention_in_the_last_layers_only():
    """``save_attention=n`` keeps attention's outputs in the graph's last n checkpointed layers
    (their backward runs first); the others recompute, each with the reason."""
    for last, kept in ((1, ["layers.1"]), (2, ["layers.0", "layers.1"]), (5, ["layers.0", "layers.1"])):
        gm = _captured_llama_graph()
        ctx = passes.PassContext(Options.parse(dict(save_attention=last)), 0)
        passes.run_passes(gm, ctx)
        records = [r for r in ctx.records if r.kind == "checkpoint"]
        assert [_layer(r.module) for r in records if r.status == "rewritten"] == kept
        bodies = [m for m in gm.modules() if isinstance(m, fx.GraphModule) and m is not gm]
        assert sum(checkpoint_policy.CONTEXT_FN_KEY in b.meta for b in bodies) == len(kept)
        assert [(_layer(r.module), r.reason) for r in records if r.status == "rejected"] == ([] if len(kept) == 2 else [
            ("layers.0", "save_attention=1 keeps attention's outputs in the last 1 of this graph's 2 checkpointed "
                         "layers with attention (their backward runs first); this one recomputes as before")])


def test_off_by_default_and_nothing_without_checkpointing():
    gm = _captured_llama_graph()
    ctx = passes.PassContext(Options.parse({}), 0)
    passes.run_passes(gm, ctx)
    assert not any(checkpoint_policy.CONTEXT_FN_KEY in m.meta for m in gm.modules() if isinstance(m, fx.GraphModule))

    model = tiny_model("llama", attn_implementation="sdpa")  # no layer checkpointing: no body to put it on
    torch.compile(model, backend="tilepass", options=dict(save_attention=True, downstream="aot_eager"))(
        input_ids=torch.randint(3, 128, (1, 16)))
    assert not rewritten("checkpoint") and not rejected("checkpoint") and rewritten("mlp")  # the passes ran


def test_the_policy_saves_attention_ops_only():
    from torch.utils.checkpoint import CheckpointPolicy

    policy = checkpoint_policy.save_attention_policy
    assert policy(None, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default) is CheckpointPolicy.MUST_SAVE
    assert policy(None, torch.ops.aten.mm.default) is CheckpointPolicy.PREFER_RECOMPUTE
    # AOTAutograd's cache keeps working, keyed by the ops kept: another set, another key
    key = checkpoint_policy.save_attention_context_fn().cache_hash
    assert "_scaled_dot_product_flash_attention_for_cpu" in key


def test_the_cache_key_follows_the_ops_kept(monkeypatch):
    """A policy keeping other ops must not reuse a graph AOTAutograd cached for this one."""
    key = checkpoint_policy.save_attention_context_fn().cache_hash
    monkeypatch.setattr(checkpoint_policy, "saved_attention_ops", lambda: frozenset())
    assert checkpoint_policy.save_attention_context_fn().cache_hash != key


def test_save_attention_must_be_a_bool_or_a_positive_int():
    for bad in ("yes", 0, -1, 1.5):
        with pytest.raises(OptionsError, match=r"'save_attention' must be True, False or a positive int \(the last n "):
            Options.parse(dict(save_attention=bad))
    assert Options.parse(dict(save_attention=2)).save_attention == 2


class _GraphOps:
    """Inductor's post-grad graphs (forward, then backward, per compiled graph) as op-name
    counts: what runs after AOTAutograd partitioned the joint graph."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append([self._name(n) for n in graph.nodes if n.op == "call_function"])

    @staticmethod
    def _name(node) -> str:
        # an op that draws random numbers is wrapped for RNG replay (run_and_save_rng_state /
        # run_with_rng_state(state, op, ...)): name the op it runs
        wrapped = [a for a in node.args if isinstance(a, torch._ops.OpOverload)]
        return str(wrapped[0]) if "rng_state" in str(node.target) and wrapped else str(node.target)

    @staticmethod
    def _is_attention(name: str) -> bool:
        # SDPA's kernels by their SDPA names, or as inductor lowers them on CUDA
        # (_efficient_attention_forward, _flash_attention_backward, ...), and flex's HOPs
        return any(key in name for key in ("flex_attention", "_scaled_dot_product", "_attention_forward",
                                           "_attention_backward"))

    def attention_ops(self) -> list[tuple[int, int]]:
        """(attention forwards, attention backwards) per graph."""
        return [(sum(self._is_attention(n) and "backward" not in n for n in ops),
                 sum(self._is_attention(n) and "backward" in n for n in ops)) for ops in self.graphs]

    def forwards_in_backward_graphs(self) -> tuple[int, int]:
        """(attention forwards in all graphs, those in graphs that also run an attention
        backward: the recomputed ones), whatever order the graphs were compiled in."""
        ops = self.attention_ops()
        return sum(f for f, _ in ops), sum(f for f, b in ops if b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_saved_attention_on_cuda():
    """On the GPU (SDPA's fused kernels): the loss and every gradient of a step that keeps
    attention's outputs equal those of the step that recomputes them. (That the forward runs
    once is shown on CPU above, in the graphs inductor compiled; on the H200 by the step
    time, docs/benchmarks.md.)"""
    model = tiny_model("llama", attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 256), device="cuda")
    results = {}
    for save in (False, True):
        torch._dynamo.reset()
        tilepass.reset()
        loss = torch.compile(model, backend="tilepass", options=dict(save_attention=save))(input_ids=ids, labels=ids).loss
        loss.backward()
        results[save] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        assert {r.kernel for r in rewritten("attention")} == {"sdpa"}
        assert len(rewritten("checkpoint")) == (2 if save else 0)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_layers_whose_attention_runs_on_flex_keep_recomputing(monkeypatch):
    """A padded batch routes attention to flex; those layers get no policy, with the reason.
    (Routed as on a GPU: the graph is rewritten, not run; CPU flex has no backward.)"""
    from tilepass import flex_versions

    monkeypatch.setattr(flex_versions, "flex_backward_supported", lambda device_type: True)
    gm = _captured_llama_graph(padded=True)
    ctx = passes.PassContext(Options.parse(dict(save_attention=True)), 0)
    passes.run_passes(gm, ctx)
    assert {r.kernel for r in ctx.records if r.kind == "attention"} == {"flex"}
    assert not any(checkpoint_policy.CONTEXT_FN_KEY in m.meta for m in gm.modules() if isinstance(m, fx.GraphModule))
    assert [(r.status, _layer(r.module), r.reason) for r in ctx.records if r.kind == "checkpoint"] == [
        ("rejected", f"layers.{i}", checkpoint_policy.FLEX_NOT_SAVED) for i in range(2)]


def test_a_learnable_mask_keeps_recomputing():
    """SDPA with a mask that requires grad runs its math path: nothing fused to keep, so the
    layer gets no policy (the record would claim what does not happen), with the reason."""
    from torch.utils.checkpoint import checkpoint

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.bias = torch.nn.Linear(32, 96), torch.nn.Parameter(torch.randn(4, 12, 12) * 0.1)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias).sum(1)

    attn = Attention()
    x = torch.randn(2, 12, 32, requires_grad=True)
    torch.compile(lambda x: checkpoint(attn, x, use_reentrant=False), backend="tilepass",
                  options=dict(save_attention=True, downstream="aot_eager"))(x).sum().backward()
    assert not rewritten("checkpoint")
    [r] = rejected("checkpoint")
    assert r.reason.startswith("an attention mask here requires grad")


def _layer(module: str) -> str:
    """A decoder layer's record, as ``layers.N``: transformers 5.25 under Dynamo names it as
    ``named_modules()`` does (``model.layers.N`` in a causal LM), 5.24 and before ``layers.N``."""
    return module.removeprefix("model.")
