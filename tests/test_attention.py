"""Attention routing to flex attention: the version table, mask lifting, CPU eval routing.

Flex attention has no backward on CPU, so training through routed attention is tested on
CUDA only (skipped here); on CPU tilepass must decline to route where gradients flow.
"""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import tilepass
from tilepass import compat, flex_versions
from tilepass.fx_utils import op_name
from tilepass.match_attention import find_attention
from tilepass.options import OptionsError
from tilepass.tiny_models import tiny_model

from conftest import rejected, rewritten


# --- the version table, every row --------------------------------------------------------

@pytest.mark.parametrize("version,dynamic,pad,train_mode,lse", [
    ((2, 5, 1), False, 128, None, "return_lse"),
    ((2, 6, 0), None, None, "max-autotune-no-cudagraphs", "return_lse"),
    ((2, 7, 0), None, None, None, "return_lse"),
    ((2, 8, 0), None, None, None, "return_lse"),
    ((2, 9, 0), None, None, None, "return_aux"),
    ((2, 13, 0), None, None, None, "return_aux"),
])
def test_version_table_rows(monkeypatch, version, dynamic, pad, train_mode, lse):
    monkeypatch.setattr(compat, "TORCH_VERSION", version)
    row = flex_versions.flex_row()
    assert (row.dynamic, row.pad_to, row.training_mode, row.lse_api) == (dynamic, pad, train_mode, lse)
    patches = flex_versions.inductor_patches(training=True, device_type="cuda")
    assert ("max_autotune" in patches) == (train_mode is not None)
    assert flex_versions.inductor_patches(training=False, device_type="cuda") == {}
    kwargs = flex_versions.lse_kwargs()
    assert list(kwargs) == [lse]


@pytest.mark.parametrize("version,device,multiple", [
    ((2, 5, 1), "cuda", 128), ((2, 13, 0), "cuda", None), ((2, 5, 1), "cpu", 128), ((2, 13, 0), "cpu", 128),
])
def test_length_multiple_per_version_and_device(monkeypatch, version, device, multiple):
    monkeypatch.setattr(compat, "TORCH_VERSION", version)
    assert flex_versions.length_multiple(device) == multiple


@pytest.mark.simd  # compiles flex attention for the CPU (conftest.py)
def test_compiled_flex_matches_sdpa_at_every_call(monkeypatch):
    """The CPU flex kernel (torch 2.13) got some rows wrong, at random, in about one call
    in five at lengths below 128 that are 8 mod 16 (40 here): the runtime pads lengths to a
    multiple of 128 on CPU. Twenty calls with fresh inputs must all match SDPA (a padded
    batch and GQA, the padded row's queries included once they see a key), at lengths 40,
    77 and 200 padded to 128 and at 128 unpadded. Without the padding (multiple None)
    length 40 fails this test, and so does padding to 48. The lengths run one after the
    other in one test: a simd test starts a pytest process of its own (conftest.py)."""
    from tilepass.attention_runtime import flex_sdpa, register_mask

    register_mask("test_padded_causal", lambda b, h, q_idx, kv_idx, keep: (kv_idx <= q_idx) & keep[b, kv_idx])

    def attend(q, k, v, keep):
        return flex_sdpa(q, k, v, [keep.to(torch.bool)], mask_key="test_padded_causal", causal=False, scale=0.25,
                         enable_gqa=True, per_batch=True, per_head=False)

    for multiple, seq in [(128, 40), (128, 77), (128, 200), (None, 128)]:
        monkeypatch.setattr(flex_versions, "length_multiple", lambda device_type, multiple=multiple: multiple)
        torch._dynamo.reset()  # a fresh compile reads the multiple
        compiled = torch.compile(attend, dynamic=False)
        keep = torch.ones(2, seq, dtype=torch.long)
        keep[1, :5] = 0
        dense = torch.ones(seq, seq, dtype=torch.bool).tril() & keep.bool()[:, None, None, :]
        for call in range(20):
            q, k, v = torch.randn(2, 4, seq, 16), torch.randn(2, 2, seq, 16), torch.randn(2, 2, seq, 16)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.25, enable_gqa=True)
            with torch.no_grad():
                got = compiled(q, k, v, keep)
            assert got.shape == want.shape
            torch.testing.assert_close(got[:, :, 5:], want[:, :, 5:], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"length {seq}, padded to a multiple of {multiple}, call {call}: {m}")


def test_version_table_rejects_old_torch():
    with pytest.raises(RuntimeError, match="flex attention needs torch>=2.5"):
        flex_versions.flex_row((2, 4, 1))


def test_lse_unpacking_matches_the_installed_api():
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 4)
    out, lse = flex_versions.unpack_lse(flex_attention(q, q, q, **flex_versions.lse_kwargs()))
    ref = torch.logsumexp((q @ q.transpose(-1, -2)) / 2.0, dim=-1)
    torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-5)


def test_cpu_devices_and_backward_feature_probe():
    assert flex_versions.inductor_patches(False, "cpu") == {"epilogue_fusion": False}
    assert flex_versions.mask_buffers_must_be_realized("cpu") and not flex_versions.mask_buffers_must_be_realized("cuda")
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 16, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
        can = True
    except NotImplementedError:
        can = False
    assert flex_versions.flex_backward_supported("cpu") is can


# --- mask lifting: exact, pointwise ----------------------------------------------------

def _filled(out: fx.Node) -> fx.Node:
    """Run the graph ``out`` is the output of (it takes no inputs), setting every node's
    example_value as Dynamo would; returns ``out``."""
    gm = fx.GraphModule(torch.nn.Module(), out.graph)

    class Fill(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if "example_value" not in n.meta or n.op != "output":
                n.meta["example_value"] = v
            return v

    Fill(gm).run()
    return out


def _capture(model, **inputs):
    """The Dynamo graph of ``model`` and the dense masks SDPA received, by node name."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=keep)(**inputs)
    gm, example_inputs = graphs[-1]
    masks, values = {}, {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
                masks[n.name] = n.kwargs.get("attn_mask") if "attn_mask" in n.kwargs else None
            return out

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)
    return gm, {k: values[m] for k, m in masks.items() if m is not None}, values


@pytest.mark.parametrize("arch,pad", [("llama", True), ("mistral", False), ("mistral", True), ("qwen3", True)])
def test_lifted_mask_equals_the_dense_mask(arch, pad):
    model = tiny_model(arch, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (2, 40))
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :13] = 0  # left padding
    gm, dense, values = _capture(model, input_ids=ids, attention_mask=am if pad else None)
    sites, rejections = find_attention(gm.graph)
    assert not rejections and len(sites) == 2 and dense
    for site in sites:
        want = dense[site.node.name].expand(2, 1, 40, 40)
        b, h, q, kv = (torch.arange(n).view(*(1 if j != i else n for j in range(4))) for i, n in enumerate((2, 1, 40, 40)))
        got = site.mask.program(b, h, q, kv, *(values[d] for d in site.mask.data)).expand(2, 1, 40, 40)
        assert torch.equal(got, want)
        assert ("b" in site.mask.uses) == pad


def test_float_mask_and_dropout_are_not_routed():
    def f(q, k, v, m):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return a + F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    g = fx.symbolic_trace(f)
    shape = (1, 2, 8, 4)
    for n in g.graph.nodes:
        if n.op == "placeholder":
            n.meta["example_value"] = torch.randn(1, 1, 8, 8) if n.name == "m" else torch.randn(shape)
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            n.meta["example_value"] = torch.randn(shape)
    sites, rejections = find_attention(g.graph)
    assert sites == []
    assert sorted(r.reason for r in rejections) == [
        "attention dropout p=0.1: flex attention has no dropout",
        "the mask is a torch.float32 tensor (an additive mask), not a boolean one",
    ]


# --- routing end to end, eval on CPU ------------------------------------------------------

def _routed_graphs(model, inputs, **options):
    graphs = []

    def wrapped(gm, example_inputs):
        fn = tilepass.tilepass_backend(gm, example_inputs, options=dict(attention=True, **options))
        graphs.append(gm)
        return fn

    with torch.no_grad():
        out = torch.compile(model, backend=wrapped)(**inputs)
    return out, graphs


def _route_and_compare(arch, impl, pad, pattern):
    """Route a tiny model's attention to flex in eval; its logits equal the unrouted model's
    (float32, on positions with a key to attend to); no [Q, KV] tensor and no SDPA are left."""
    model = tiny_model(arch, attn_implementation=impl).eval()
    ids = torch.randint(3, 128, (2, 150))
    am = torch.ones(2, 150, dtype=torch.long)
    am[1, :37] = 0
    inputs = dict(input_ids=ids, attention_mask=am if pad else None)
    with torch.no_grad():
        want = model(**inputs).logits
    out, graphs = _routed_graphs(model, inputs, mlp=False, attention_kernel="flex")
    valid = am.bool() if pad else torch.ones_like(am, dtype=torch.bool)
    torch.testing.assert_close(out.logits[valid], want[valid], rtol=1e-5, atol=1e-5)
    patterns = {pattern} if isinstance(pattern, str) else pattern  # transformers versions differ
    got = [r.pattern for r in rewritten("attention")]
    assert len(got) == 2 and set(got) <= patterns, got
    for gm in graphs:
        for n in gm.graph.nodes:
            v = n.meta.get("example_value")
            assert not (isinstance(v, torch.Tensor) and v.dim() == 4 and tuple(v.shape[-2:]) == (150, 150)), n.name
            assert n.target is not F.scaled_dot_product_attention


@pytest.mark.parametrize("arch,pad,pattern", [
    # an unpadded causal mask: is_causal (transformers 5.24), or a mask folded to kv <= q (5.17)
    ("llama", False, {"causal", "mask(kv_idx,q_idx)"}), ("llama", True, "mask(b,kv_idx,q_idx)"),
    ("mistral", False, "mask(kv_idx,q_idx)"), ("mistral", True, "mask(b,kv_idx,q_idx)"),
])
def test_eval_routing_matches_sdpa(routed_graph_on_aot_eager, arch, pad, pattern):
    _route_and_compare(arch, "sdpa", pad, pattern)


@pytest.mark.parametrize("arch,pad,pattern", [
    pytest.param("gemma2", True, "eager+softcap(50)+mask(b,kv_idx,q_idx)", marks=pytest.mark.simd),  # score_mod + mask_mod
    ("gemma2", False, "eager+softcap(50)+mask(kv_idx,q_idx)"),
    ("llama", True, "eager+mask(b,kv_idx,q_idx)"),
])
def test_eager_attention_form_is_routed(routed_graph_on_aot_eager, arch, pad, pattern):
    """softmax(q @ repeat_kv(k)^T * scale [, tanh softcap] + where(mask, 0, min)) @ v: the
    softcap becomes a score_mod, the additive mask a mask_mod, repeat_kv becomes GQA. On
    aot_eager (conftest.routed_graph_on_aot_eager) except the case marked simd, compiled by
    inductor: a score_mod and a mask_mod reading a captured tensor. Inductor's flex kernel
    itself (lengths, padding, GQA): test_compiled_flex_matches_sdpa_at_every_call."""
    _route_and_compare(arch, "eager", pad, pattern)


def test_attention_sinks_on_cpu_are_left_alone_with_a_reason(routed_graph_on_aot_eager):
    model = tiny_model("gpt_oss", attn_implementation="eager", num_hidden_layers=1).eval()
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = torch.compile(model, backend="tilepass", options=dict(attention=True, mlp=False, moe=False))(
            input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert {r.reason for r in rejected("attention")} == {
        "attention sinks need flex attention's log-sum-exp, which compiled flex attention does not return on cpu"}


def _rewrite_captured_graph(monkeypatch, model, inputs, **options):
    """Capture ``model``'s Dynamo graph, run it, rewrite it with tilepass's passes, run it
    again (eagerly: CPU flex attention runs uncompiled here), return both outputs and the
    pass records. Lets CPU check rewrites whose compiled form needs a GPU."""
    return _rewrite_fn(model, kwargs=inputs, **options)


def _rewrite_fn(fn, args=(), kwargs=None, **options):
    from tilepass import passes
    from tilepass.options import Options

    captured = []
    torch.compile(fn, backend=lambda gm, ex: captured.append((gm, ex)) or gm.forward)(*args, **(kwargs or {}))
    gm, example_inputs = max(captured, key=lambda c: len(c[0].graph.nodes))
    # detached: a checkpointed body may switch grad mode on inside, and CPU flex has no backward
    example_inputs = [e.detach() if isinstance(e, torch.Tensor) else e for e in example_inputs]
    with torch.no_grad():
        want = gm(*example_inputs)[0]
    ctx = passes.PassContext(Options.parse(dict(options)), 0)
    passes.run_passes(gm, ctx)
    with torch.no_grad():
        got = gm(*example_inputs)[0]
    return gm, want, got, ctx.records


def test_attention_sinks_rewrite_matches_the_eager_math(monkeypatch):
    """GPT-OSS (sinks, alternating sliding/full windows, GQA): the rewritten graph, run
    with flex attention's log-sum-exp, equals the eager softmax-with-sinks."""
    monkeypatch.setattr(flex_versions, "lse_in_compiled_graph", lambda device_type: True)
    model = tiny_model("gpt_oss", attn_implementation="eager", sliding_window=16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # sinks that matter
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        gm, want, got, records = _rewrite_captured_graph(
            monkeypatch, model, dict(input_ids=ids, use_cache=False), attention=True, mlp=False, moe=False)
    assert [(r.status, r.pattern) for r in records] == [("rewritten", "eager+sinks+mask(kv_idx,q_idx)")] * 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(op_name(n) in ("softmax", "cat") and tuple(getattr(n.meta.get("example_value"), "shape", ()))[-2:] == (40, 41)
                   for n in gm.graph.nodes)


def test_sinks_renormalisation_equals_a_softmax_with_an_extra_column():
    from tilepass.attention_runtime import flex_sdpa

    q, k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    sinks = torch.randn(4) * 3
    got = flex_sdpa(q, k, v, [], mask_key=None, causal=True, scale=0.3, enable_gqa=True, per_batch=False,
                    per_head=False, sinks=sinks)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.cat([scores, sinks.view(1, 4, 1, 1).expand(2, 4, 24, 1)], -1).softmax(-1)[..., :-1]
    torch.testing.assert_close(got, probs @ vr, rtol=1e-5, atol=1e-5)


def test_training_on_cpu_is_not_routed_to_flex_and_stays_exact(routed_graph_on_aot_eager):
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(3, 128, (2, 24))
    am = torch.ones(2, 24, dtype=torch.long)
    am[1, :5] = 0  # padding: a mask only flex can take
    want = model(input_ids=ids, attention_mask=am, labels=ids).loss
    got = torch.compile(model, backend="tilepass", options=dict(attention=True, num_tiles=2))(
        input_ids=ids, attention_mask=am, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    reasons = {r.reason for r in rejected("attention")}
    assert reasons == {"flex attention cannot run a backward on cpu with this torch; attention is routed there "
                       "only where no gradient flows (eval, no_grad)"}
    assert len(rewritten("mlp")) == 2


def test_attention_needs_inductor():
    with pytest.raises(OptionsError, match="use downstream='inductor'"):
        tilepass.backend(attention=True, downstream="aot_eager")


def test_attention_is_off_by_default():
    model = tiny_model("llama", attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager"))(input_ids=torch.randint(3, 128, (1, 8)))
    assert not rewritten("attention") and not rejected("attention")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention training needs a GPU (no CPU backward)")
@pytest.mark.parametrize("arch,impl,pad,ckpt,kernel,seq", [
    ("llama", "sdpa", False, False, "flex", 256), ("llama", "sdpa", True, True, "auto", 256),
    ("mistral", "sdpa", True, False, "auto", 256),
    ("gemma2", "eager", True, False, "auto", 256), ("gemma2", "eager", False, False, "auto", 256),
    ("gemma2-nosoftcap", "eager", True, False, "auto", 256), ("gpt_oss", "eager", False, False, "auto", 256),
    ("gpt_oss", "eager", True, False, "auto", 256),
    # plain causal: SDPA's fused kernel, from the dense mask and from the eager form in checkpointed layers
    ("llama", "sdpa", False, True, "auto", 256), ("llama", "eager", False, True, "auto", 256),
    # lengths that are no multiple of flex's 128-token blocks (padded on CPU, not on CUDA)
    ("mistral", "sdpa", True, False, "auto", 200), ("gemma2", "eager", True, False, "auto", 200),
    ("gpt_oss", "eager", True, False, "auto", 200),
])
def test_training_on_cuda_matches_sdpa(arch, impl, pad, ckpt, kernel, seq):
    """Loss and every parameter gradient (GPT-OSS: the sinks' too) of a routed training
    step equal the unrouted model's (float32 on CUDA; flex and SDPA accumulate in
    different orders)."""
    overrides = {"gpt_oss": {"sliding_window": 64}, "gemma2-nosoftcap": {"attn_logit_softcapping": None}}.get(arch, {})
    arch = arch.split("-")[0]
    model = tiny_model(arch, attn_implementation=impl, **overrides).cuda()
    if arch == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 2.0)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, seq), device="cuda")
    am = torch.ones(2, seq, dtype=torch.long, device="cuda")
    am[1, :37] = 0
    # A query row with every key masked (a left pad) is 0 in flex and SDPA, but the mean of
    # all values in the eager softmax form: the two agree where the loss never reads such a
    # row. Labelling the pads -100 is not enough: after the shift, the last pad predicts the
    # first real token (docs/attention.md), so that label is dropped as well.
    labels = ids.clone()
    labels[1, :38] = -100
    inputs = dict(input_ids=ids, attention_mask=am if pad else None, labels=labels if pad else ids)
    want_loss = model(**inputs).loss
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got_loss = torch.compile(model, backend="tilepass", options=dict(attention=True, attention_kernel=kernel))(**inputs).loss
    got_loss.backward()
    assert len(rewritten("attention")) == 2, tilepass.report()
    plain_causal = not pad and arch == "llama"
    assert {r.kernel for r in rewritten("attention")} == {"sdpa" if plain_causal and kernel == "auto" else "flex"}
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"grad of {n}: {m}")



@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager")])
def test_checkpointed_layers_are_routed_with_the_mask_built_outside(monkeypatch, arch, impl):
    """Layer checkpointing puts each layer in a tag_activation_checkpoint body that receives
    the dense mask as an input. The mask is followed out of the body, its data (the 2-D
    attention_mask) passed in, and the dense [B, 1, Q, KV] construction leaves the outer
    graph. The training graph is rewritten and run without gradients (CPU flex attention
    has no backward), against the same graph unrewritten."""
    monkeypatch.setattr(flex_versions, "flex_backward_supported", lambda device_type: True)
    model = tiny_model(arch, attn_implementation=impl)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 150))
    am = torch.ones(2, 150, dtype=torch.long)
    am[1, :37] = 0
    gm, want, got, records = _rewrite_captured_graph(monkeypatch, model, dict(input_ids=ids, attention_mask=am),
                                                     attention=True, mlp=False)
    assert sum(op_name(n) == "tag_activation_checkpoint" for n in gm.graph.nodes) == 2
    assert [r.status for r in records] == ["rewritten", "rewritten"]
    torch.testing.assert_close(got[am.bool()], want[am.bool()], rtol=1e-5, atol=1e-5)
    for sub in (m for m in gm.modules() if isinstance(m, fx.GraphModule)):
        for n in sub.graph.nodes:
            v = n.meta.get("example_value")
            assert not (isinstance(v, torch.Tensor) and v.dim() == 4 and tuple(v.shape[-2:]) == (150, 150)), n.name


def test_mask_ops_recorded_as_tensor_dunders_are_lifted():
    """Dynamo may record ``a <= b`` as ``operator.le``, ``Tensor.__le__`` or a ``__le__`` method
    call (torch 2.11 on CUDA records the packed-sequence ``==`` as ``__eq__``)."""
    from tilepass.mask_program import lift_mask

    g = fx.Graph()
    ar = g.call_function(torch.arange, (8,))
    qi = g.call_function(operator.getitem, (ar, (None, None, slice(None), None)))
    ki = g.call_function(operator.getitem, (ar, (None, None, None, slice(None))))
    causal = g.call_function(torch.Tensor.__le__, (ki, qi))
    same = g.call_method("__eq__", (qi, qi))
    mask = g.call_method("__and__", (causal, same))
    mask.meta["example_value"] = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    g.output(mask)
    lifted = lift_mask(_filled(mask))
    i = torch.arange(8)
    got = lifted.program(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                         i.view(1, 1, 8, 1), i.view(1, 1, 1, 8))
    assert torch.equal(got.expand(1, 1, 8, 8)[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_documents_are_routed(routed_graph_on_aot_eager, impl):
    """Packed sequences: position_ids restart at each document; transformers turns the
    restarts into document ids, and the lifted mask gathers them (no attention across
    documents). Outputs equal the unrouted model's."""
    model = tiny_model("llama", attn_implementation=impl, num_hidden_layers=1).eval()
    ids = torch.randint(3, 128, (2, 150))
    lengths = [[60, 50, 40], [100, 50]]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)  # with a cache, transformers does not pack
    with torch.no_grad():
        want = model(**inputs).logits
        separate = model(input_ids=ids[:1, 60:110], position_ids=position_ids[:1, 60:110], use_cache=False).logits
    torch.testing.assert_close(want[:1, 60:110], separate, rtol=1e-5, atol=1e-5)  # the model really packs
    out, graphs = _routed_graphs(model, inputs, mlp=False)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert [r.pattern for r in rewritten("attention")] == [("eager+" if impl == "eager" else "") + "mask(b,kv_idx,q_idx)"]


def test_positions_from_an_arange_fold_to_a_plain_causal_mask():
    """Under compile transformers derives the mask from position ids (and document ids
    from their restarts) even when they are just an arange. Computed from constants, they
    fold: the mask program reads no data and is not per batch, i.e. causal."""
    from tilepass.hop_inputs import BodyInputs

    model = tiny_model("llama", attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # then it builds a mask
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(input_ids=torch.randint(3, 128, (2, 40)))
    inputs = BodyInputs(graphs[0])
    bodies = [m for m in graphs[0].modules() if isinstance(m, fx.GraphModule) and m is not graphs[0]]
    sites = [s for body in bodies for s in find_attention(body.graph, inputs.source)[0]]
    assert len(bodies) == len(sites) == 2
    for site in sites:
        assert site.mask.data == [] and site.mask.uses == {"q_idx", "kv_idx"}
        i = torch.arange(40)
        got = site.mask.program(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                                i.view(1, 1, 40, 1), i.view(1, 1, 1, 40))
        assert torch.equal(got.expand(1, 1, 40, 40)[0, 0], torch.ones(40, 40, dtype=torch.bool).tril())


def test_softcap_is_routed_while_training(monkeypatch):
    """Gemma 2's softcap becomes a score_mod in training graphs too (where flex has a
    backward): the rewritten training graph equals the captured one."""
    monkeypatch.setattr(flex_versions, "flex_backward_supported", lambda device_type: True)
    model = tiny_model("gemma2", attn_implementation="eager")
    ids = torch.randint(3, 128, (2, 40))
    gm, want, got, records = _rewrite_captured_graph(monkeypatch, model, dict(input_ids=ids), attention=True, mlp=False)
    assert [(r.status, r.pattern) for r in records] == [("rewritten", "eager+softcap(50)+mask(kv_idx,q_idx)")] * 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_form_in_checkpointed_layers_is_declined_where_it_faults(monkeypatch):
    """Where flex_versions says the eager form faults inside checkpointed layers (CUDA,
    torch 2.11), those sites stay as they are, with the reason; the graph still runs."""
    monkeypatch.setattr(flex_versions, "flex_backward_supported", lambda device_type: True)
    monkeypatch.setattr(flex_versions, "eager_form_in_checkpoint_supported", lambda device_type: False)
    model = tiny_model("gemma2", attn_implementation="eager", attn_logit_softcapping=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 40))
    gm, want, got, records = _rewrite_captured_graph(monkeypatch, model, dict(input_ids=ids), attention=True, mlp=False,
                                                     attention_kernel="flex")  # the fault is flex's
    assert [(r.status, r.reason) for r in records] == [(
        "rejected", "eager-form attention inside a checkpointed layer is not routed on cpu (a known fault on torch "
                    "2.11 CUDA); use attn_implementation='sdpa' or no layer checkpointing")] * 2
    assert torch.equal(got, want)



# --- never a wrong result: what the rewrite must leave alone --------------------------------

def _with_flex_everywhere(monkeypatch):
    monkeypatch.setattr(flex_versions, "flex_backward_supported", lambda device_type: True)
    monkeypatch.setattr(flex_versions, "lse_in_compiled_graph", lambda device_type: True)


def test_in_place_writes_survive_the_cleanup(monkeypatch):
    """The dead-code pass after a rewrite keeps unused in-place ops (KV-cache writes, an
    embedding scaled in place in the outer graph of checkpointed layers)."""
    _with_flex_everywhere(monkeypatch)
    model = tiny_model("llama", attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def f(ids):
        emb = model.model.embed_tokens(ids)
        emb.mul_(3.0)
        return model(inputs_embeds=emb, use_cache=False).logits

    gm, want, got, records = _rewrite_fn(f, (torch.randint(3, 128, (2, 40)),), attention=True, mlp=False)
    assert [r.status for r in records] == ["rewritten", "rewritten"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any(n.target == "mul_" for n in gm.graph.nodes)


def test_mask_data_written_in_place_is_not_folded(monkeypatch):
    """Document ids built from constants and then written in place are not constants."""
    _with_flex_everywhere(monkeypatch)

    def f(q, k, v):
        doc = torch.zeros(2, 16, dtype=torch.long)
        doc[:, 8:] = 1  # two packed documents
        ar = torch.arange(16)
        qi, ki, bi = ar[None, None, :, None], ar[None, None, None, :], torch.arange(2)[:, None, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi) & (doc[bi, ki] == doc[bi, qi]))

    gm, want, got, records = _rewrite_fn(f, tuple(torch.randn(2, 2, 16, 8) for _ in range(3)), attention=True)
    assert [(r.status, r.pattern) for r in records] == [("rewritten", "mask(b,kv_idx,q_idx)")]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_dim,routed", [(-1, True), (2, False), (1, False)])
def test_sinks_need_the_row_max(monkeypatch, max_dim, routed):
    """Subtracting a max over another dim is not a no-op under softmax: left alone."""
    _with_flex_everywhere(monkeypatch)

    def f(q, k, v, sinks):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.3
        c = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], dim=-1)
        c = c - c.max(dim=max_dim, keepdim=True).values
        return torch.matmul(F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1], v)

    args = (*(torch.randn(2, 4, 12, 8) for _ in range(3)), torch.randn(4) * 2)
    gm, want, got, records = _rewrite_fn(f, args, attention=True)
    assert [r.status for r in records] == ["rewritten" if routed else "rejected"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_additive_mask_read_from_an_offset_slice_is_left_alone(monkeypatch):
    _with_flex_everywhere(monkeypatch)

    def f(q, k, v):
        qa, ka = torch.arange(16), torch.arange(12)
        m = torch.where(ka[None, None, None, :] <= qa[None, None, :, None], 0.0, torch.finfo(torch.float32).min)
        s = torch.matmul(q, k.transpose(2, 3)) * 0.3 + m[:, :, 4:, :]  # rows 4..: queries shifted by 4
        return torch.matmul(F.softmax(s, dim=-1), v)

    gm, want, got, records = _rewrite_fn(f, tuple(torch.randn(1, 2, 12, 8) for _ in range(3)), attention=True)
    assert [(r.status, r.reason) for r in records] == [("rejected", "the additive mask is read from an offset slice")]
    torch.testing.assert_close(got, want)


def test_static_kv_cache_writes_survive_the_rewrite(routed_graph_on_aot_eager):
    """Prefill with a StaticCache: the cache writes (unused index_copy_ results) stay in the
    rewritten graph, so the cache holds the same keys/values as an eager prefill."""
    from transformers import StaticCache

    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1).eval()
    ids = torch.randint(3, 128, (1, 12))
    caches = [StaticCache(config=model.config, max_cache_len=32) for _ in range(2)]
    with torch.no_grad():
        want = model(input_ids=ids, past_key_values=caches[0], use_cache=True).logits
        got = torch.compile(model, backend="tilepass", options=dict(num_tiles=2, attention_kernel="flex"))(
            input_ids=ids, past_key_values=caches[1], use_cache=True).logits
    assert rewritten("mlp") and rewritten("attention")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.keys.abs().sum() > 0
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)


def test_routed_graphs_compile_once_per_mode(routed_graph_on_aot_eager):
    """Routing happens inside the graph handed to inductor (here run on aot_eager: Dynamo's
    compile count is the point): calls with the same shapes reuse it, and flipping
    train/eval compiles once per mode (Dynamo's guard), not per call."""
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1).eval()
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return tilepass.tilepass_backend(gm, example_inputs, options=dict(mlp=False))

    fn = torch.compile(model, backend=counting)
    ids = torch.randint(3, 128, (1, 130))
    with torch.no_grad():
        for mode in ("eval", "eval", "train", "train", "eval"):
            getattr(model, mode)()
            fn(input_ids=ids, use_cache=False)
    assert len(compiles) == 2
    assert len(rewritten("attention")) == 2  # the site, in each mode's graph


@pytest.mark.parametrize("eq", [operator.eq, torch.eq, torch.Tensor.__eq__, "__eq__"])
def test_folded_constants_propagate_through_the_mask_program(eq):
    """Uniform document ids (no packing) fold to Python constants; ``doc[q] == doc[kv]``
    then evaluates to True and ``causal & True`` to ``causal``: the program reads neither
    data nor extra arithmetic, in every spelling of ``==`` (torch 2.11 on CUDA records the
    method ``__eq__``; before this folded, its program kept ``(q * 0 + 0).__eq__(0)``)."""
    from tilepass.mask_program import is_plain_causal, lift_mask

    g = fx.Graph()
    ar = g.call_function(torch.arange, (8,))
    qi = g.call_function(operator.getitem, (ar, (None, None, slice(None), None)))
    ki = g.call_function(operator.getitem, (ar, (None, None, None, slice(None))))
    bi = g.call_function(operator.getitem, (g.call_function(torch.arange, (2,)), (slice(None), None, None, None)))
    doc = g.call_function(torch.zeros, ((2, 8),), {"dtype": torch.long})
    doc.meta["example_value"] = torch.zeros(2, 8, dtype=torch.long)
    gathers = (g.call_function(operator.getitem, (doc, (bi, qi))), g.call_function(operator.getitem, (doc, (bi, ki))))
    same = g.call_method("to", (g.call_method(eq, gathers) if isinstance(eq, str) else g.call_function(eq, gathers),
                                torch.bool))
    mask = g.call_function(operator.and_, (g.call_function(operator.le, (ki, qi)), same))
    mask.meta["example_value"] = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    g.output(mask)
    lifted = lift_mask(_filled(mask))
    assert lifted.data == [] and lifted.uses == {"q_idx", "kv_idx"}
    i = torch.arange(8)
    got = lifted.program(torch.arange(2).view(2, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                         i.view(1, 1, 8, 1), i.view(1, 1, 1, 8))
    assert torch.equal(got.expand(2, 1, 8, 8), torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8))
    assert [n.target for n in lifted.program.graph.nodes if n.op in ("call_function", "call_method")] == [operator.le]
    assert is_plain_causal(lifted)


@pytest.mark.parametrize("dynamic", [None, False])
def test_varying_sequence_lengths(routed_graph_on_aot_eager, dynamic):
    """A second length makes Dynamo compile a dynamic-shape graph; routing that is not
    supported yet (flex_versions.symbolic_lengths_supported), so it stays SDPA with the
    reason. With dynamic=False every length gets its own routed graph. Outputs stay right.
    (On aot_eager: what is tested is which graphs are routed, not inductor's kernels.)"""
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1).eval()
    fn = torch.compile(model, backend="tilepass", options=dict(mlp=False), dynamic=dynamic)
    for seq in (40, 56, 77) if dynamic is None else (40, 56):
        ids = torch.randint(3, 128, (2, seq))
        am = torch.ones(2, seq, dtype=torch.long)
        am[1, :5] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=am, use_cache=False).logits
            got = fn(input_ids=ids, attention_mask=am, use_cache=False).logits
        torch.testing.assert_close(got[am.bool()], want[am.bool()], rtol=1e-5, atol=1e-5)
    statuses = [r.status for r in tilepass.report() if r.kind == "attention"]
    if dynamic is False:
        assert statuses == ["rewritten"] * 2
    else:  # the first length routed; the symbolic graph (second and third lengths) not
        assert statuses == ["rewritten", "rejected"]
        assert {r.reason for r in rejected("attention")} == {
            "dynamic sequence length: routing it to flex attention is not supported yet (inductor fails on it); "
            "torch.compile(..., dynamic=False) routes each length"}


# --- plain causal masks go to SDPA's fused kernels (attention_kernel="auto") ---------------

def _program(build):
    """A mask program fn(b, h, q_idx, kv_idx) from ``build(q, kv) -> node``."""
    from tilepass.mask_program import MaskProgram

    g = fx.Graph()
    b, h, q, kv = (g.placeholder(n) for n in ("b", "h", "q_idx", "kv_idx"))
    g.output(build(g, q, kv))
    return MaskProgram(fx.GraphModule(torch.nn.Module(), g), [], frozenset({"q_idx", "kv_idx"}))


@pytest.mark.parametrize("build,causal", [
    (lambda g, q, kv: g.call_function(operator.le, (kv, q)), True),
    (lambda g, q, kv: g.call_function(operator.ge, (q, kv)), True),
    (lambda g, q, kv: g.call_method("__le__", (kv, q)), True),
    (lambda g, q, kv: g.call_function(torch.ge, (q, kv)), True),
    (lambda g, q, kv: g.call_function(operator.le, (q, kv)), False),  # the other triangle
    (lambda g, q, kv: g.call_function(operator.lt, (kv, q)), False),  # no diagonal
    (lambda g, q, kv: g.call_function(operator.le, (kv, g.call_function(operator.add, (q, 1)))), False),  # offset
    (lambda g, q, kv: g.call_function(operator.and_, (g.call_function(operator.le, (kv, q)),
                                                      g.call_function(operator.gt, (kv, g.call_function(operator.sub, (q, 4))))
                                                      )), False),  # sliding window
])
def test_plain_causal_programs_are_recognised_exactly(build, causal):
    from tilepass.mask_program import is_plain_causal

    assert is_plain_causal(_program(build)) is causal


def _causal_attention(eager_form):
    """An attention block as transformers writes it under compile: a boolean causal mask
    built from aranges, then SDPA (or the eager softmax form, in float64 throughout), GQA by
    repeat_kv. Float64-exact on CPU, unlike transformers' float32 RoPE."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv, self.o = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
            k, v = self.kv(x).view(b, s, 2, 2, 8).permute(2, 0, 3, 1, 4)
            k, v = (t[:, :, None, :, :].expand(b, 2, 2, s, 8).reshape(b, 4, s, 8) for t in (k, v))  # repeat_kv
            i = torch.arange(s, device=x.device)
            mask = (i[None, None, None, :] <= i[None, None, :, None]).expand(b, 1, s, s)
            if eager_form:
                scores = q @ k.transpose(2, 3) * 8 ** -0.5
                scores = scores + torch.where(mask, torch.tensor(0.0, dtype=x.dtype), torch.finfo(x.dtype).min)
                out = torch.softmax(scores, dim=-1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o(out.transpose(1, 2).reshape(b, s, 32))

    return Attention


@pytest.mark.parametrize("eager_form", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_plain_causal_trains_on_sdpa_exactly(eager_form, ckpt):
    """Training on CPU, float64: the causal site becomes SDPA(is_causal=True) over the
    un-repeated kv heads (GQA), inside checkpointed layers too; outputs and every gradient
    equal eager at 1e-10, and no [Q, KV] tensor is left in the graph inductor gets."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    attn = _causal_attention(eager_form)().double()

    def f(x):
        return checkpoint(attn, x, use_reentrant=False) if ckpt else attn(x)

    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 37, 32, dtype=torch.float64)
    graphs = []

    def keep(gm, example_inputs):
        fn = tilepass.tilepass_backend(gm, example_inputs)
        graphs.append(gm)
        return fn

    results = []
    for fn in (f, torch.compile(f, backend=keep)):
        out = fn(x)
        grads = torch.autograd.grad((out * w).sum(), [x, *attn.parameters()])
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    [record] = rewritten("attention")
    assert record.kernel == "sdpa" and not rejected("attention")
    sdpa = [n for gm in graphs for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == 1 and sdpa[0].kwargs == dict(is_causal=True, scale=8 ** -0.5 if eager_form else None, enable_gqa=True)
    assert tuple(sdpa[0].args[1].meta["example_value"].shape) == (2, 2, 37, 8)  # the kv heads, not repeated
    for gm in graphs:
        for m in gm.modules():
            for n in getattr(m, "graph", fx.Graph()).nodes:
                v = n.meta.get("example_value")
                assert not (isinstance(v, torch.Tensor) and tuple(v.shape[-2:]) == (37, 37)), n.name


def test_plain_causal_llama_trains_through_sdpa_in_checkpointed_layers(routed_graph_on_aot_eager):
    """A transformers Llama with layer checkpointing (the benchmark's setting: under compile
    it builds a dense mask from positions): both sites go to SDPA is_causal, the MLPs are
    tiled, and a float64 training step matches eager (to the tolerance test_hf_models uses
    against eager: transformers' RoPE is float32; the float64-exact check is
    test_plain_causal_trains_on_sdpa_exactly). On aot_eager; the same step compiled by
    inductor: test_save_attention.test_saved_attention_in_a_checkpointed_llama."""
    from conftest import assert_close_results, checkpointed_llama_step, train_step

    model, inputs, weights = checkpointed_llama_step()
    want = train_step(model, inputs, weights)
    got = train_step(model, inputs, weights, call=torch.compile(model, backend="tilepass", options=dict(num_tiles=3)))
    assert_close_results(got, want, rtol=1e-4, atol=1e-5)
    assert [r.kernel for r in rewritten("attention")] == ["sdpa", "sdpa"] and len(rewritten("mlp")) == 2


def test_attention_kernel_flex_keeps_causal_on_flex(routed_graph_on_aot_eager):
    model = tiny_model("llama", attn_implementation="eager", num_hidden_layers=1).eval()
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for kernel in ("auto", "flex"):
            tilepass.reset()
            got = torch.compile(model, backend="tilepass", options=dict(attention_kernel=kernel, mlp=False))(input_ids=ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert [r.kernel for r in rewritten("attention")] == [{"auto": "sdpa", "flex": "flex"}[kernel]]
            torch._dynamo.reset()


def test_sdpa_without_a_mask_is_left_as_it_is():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 16, 8)
    gm, want, got, records = _rewrite_fn(f, (q, q, q), attention=True)
    assert [(r.status, r.reason) for r in records] == [
        ("rejected", "SDPA without a mask already: its fused kernels are the fastest route")]
    assert torch.equal(got, want)
    _, _, _, records = _rewrite_fn(f, (q, q, q), attention=True, attention_kernel="flex")
    assert [(r.status, r.kernel) for r in records] == [("rewritten", "flex")]


@pytest.mark.parametrize("and_op", ["operator", "dunder_function", "dunder_method"])
@pytest.mark.parametrize("move", ["positional", "keyword"])
def test_and_masks_start_value_and_device_move_fold_to_plain_causal(and_op, move):
    """transformers' and_masks: ``new_ones((), dtype=bool) & causal(...).to(device)``, in each
    spelling Dynamo records (torch 2.11 on CUDA records operators as Tensor dunders):
    the start value and the move fold away, leaving ``kv_idx <= q_idx``."""
    from tilepass.mask_program import is_plain_causal, lift_mask

    g = fx.Graph()
    ar = g.call_function(torch.arange, (8,))
    qi = g.call_function(operator.getitem, (ar, (None, None, slice(None), None)))
    ki = g.call_function(operator.getitem, (ar, (None, None, None, slice(None))))
    ones = g.call_method("new_ones", (qi, ()), {"dtype": torch.bool})
    le = g.call_function(operator.le, (ki, qi))
    moved = (g.call_method("to", (le, torch.device("cpu"))) if move == "positional"
             else g.call_method("to", (le,), {"device": torch.device("cpu")}))
    mask = {"operator": lambda: g.call_function(operator.and_, (ones, moved)),
            "dunder_function": lambda: g.call_function(torch.Tensor.__and__, (ones, moved)),
            "dunder_method": lambda: g.call_method("__and__", (ones, moved))}[and_op]()
    mask.meta["example_value"] = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    g.output(mask)
    lifted = lift_mask(_filled(mask))
    assert is_plain_causal(lifted), lifted.program.code
    i = torch.arange(8)
    got = lifted.program(None, None, i.view(1, 1, 8, 1), i.view(1, 1, 1, 8))
    assert torch.equal(got.expand(1, 1, 8, 8)[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


@pytest.mark.parametrize("eager_form", [False, True])
def test_plain_causal_routes_under_dynamic_lengths(eager_form):
    """With a symbolic length, flex is not routed, but a mask that is literally causal over
    one symbol for queries and keys still goes to SDPA's causal kernel (float64, exact).
    (transformers' own masks under dynamic shapes read position data, which only folds to a
    constant with static shapes: those stay, with the flex reason; see
    test_varying_sequence_lengths.)"""
    torch.manual_seed(0)
    attn = _causal_attention(eager_form)().double()
    fn = torch.compile(attn, backend="tilepass", dynamic=True)
    for seq in (40, 57):
        x = torch.randn(2, seq, 32, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, seq, 32, dtype=torch.float64)
        want = torch.autograd.grad((attn(x) * w).sum(), [x, *attn.parameters()])
        got = torch.autograd.grad((fn(x) * w).sum(), [x, *attn.parameters()])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    records = [r for r in tilepass.report() if r.kind == "attention"]
    assert [(r.status, r.kernel) for r in records] == [("rewritten", "sdpa")]  # one graph, symbolic length


# --- position and document ids under symbolic lengths: proved op by op ----------------------

def _traced(build):
    """An FX graph from ``build(g) -> node``, every node's example_value filled by running it."""
    g = fx.Graph()
    out = build(g)
    g.output(out)
    return _filled(out)


def _pos(g, n=12, start=None):
    ar = g.call_function(torch.arange, (n,) if start is None else (start, start + n))
    return g.call_method("expand", (g.call_method("unsqueeze", (ar, 0)), 3, -1))  # [3, n]


def _doc_ids(g, pos, dummy=1):
    first = g.call_function(operator.sub, (g.call_function(operator.getitem, (pos, (slice(None), slice(None, 1)))), dummy))
    diff = g.call_function(torch.diff, (pos,), {"prepend": first, "dim": -1})
    return g.call_method("cumsum", (g.call_function(operator.ne, (diff, 1)), -1))


@pytest.mark.parametrize("name,build", [
    ("positions", lambda g: _pos(g)),
    ("positions from 5", lambda g: _pos(g, start=5)),
    ("positions + 3", lambda g: g.call_function(operator.add, (_pos(g), 3))),
    ("document ids (transformers)", lambda g: _doc_ids(g, _pos(g))),
    ("document ids, wrong dummy", lambda g: _doc_ids(g, _pos(g), dummy=2)),
    ("doubled positions", lambda g: g.call_function(operator.mul, (_pos(g), 2))),
    ("reversed positions", lambda g: g.call_function(operator.sub, (11, _pos(g)))),
    ("positions, last dim unsqueezed", lambda g: g.call_method("unsqueeze", (g.call_function(torch.arange, (12,)), -1))),
    ("positions sliced from 1", lambda g: g.call_function(operator.getitem, (_pos(g), (slice(None), slice(1, None))))),
    ("first position", lambda g: g.call_function(operator.getitem, (_pos(g), (slice(None), slice(None, 1))))),
    ("cumsum of ones", lambda g: g.call_method("cumsum", (g.call_function(operator.eq, (_pos(g), _pos(g))), -1))),
    ("comparison of positions", lambda g: g.call_function(operator.ne, (_pos(g), 1))),
    ("positions as bool", lambda g: g.call_method("to", (_pos(g), torch.bool))),
    # narrow dtypes wrap: their values are not the index (review of stop 9)
    ("uint8 positions past 255", lambda g: g.call_method("expand", (g.call_method("unsqueeze", (
        g.call_function(torch.arange, (300,), {"dtype": torch.uint8}), 0)), 3, -1))),
    ("int8 positions + 100", lambda g: g.call_function(operator.add, (g.call_method("expand", (g.call_method(
        "unsqueeze", (g.call_function(torch.arange, (12,), {"dtype": torch.int8}), 0)), 3, -1)), 100))),
])
def test_symbolic_constant_facts_agree_with_evaluation(name, build):
    """The abstract interpreter used under symbolic lengths, run on static graphs against
    plain evaluation: every fact it proves ("uniform c", "position off") is what the values
    are; where it cannot prove one it says nothing (None), never something else."""
    from tilepass.mask_constants import constant_data as _constant_data, symbolic_constant_data as _symbolic_constant_data

    node = _traced(build)
    proved, evaluated = _symbolic_constant_data(node), _constant_data(node)
    assert proved is None or proved == evaluated, (name, proved, evaluated)
    expected = {"positions": ("position", 0), "positions from 5": ("position", 5), "positions + 3": ("position", 3),
                "document ids (transformers)": ("uniform", 0), "first position": ("uniform", 0)}
    assert proved == expected.get(name), (name, proved)


def test_transformers_masks_route_to_sdpa_under_dynamic_lengths(routed_graph_on_aot_eager):
    """Layer checkpointing and varying lengths: the third length compiles a graph with a
    symbolic length. Its positions and document ids are an arange and zeros, proved without
    evaluating, so the mask is plain causal and goes to SDPA's kernel (flex is not routed
    with symbolic lengths). Training losses match eager at every length."""
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fn = torch.compile(model, backend="tilepass", options=dict(num_tiles=2))
    for seq in (40, 56, 77):
        ids = torch.randint(3, 128, (2, seq))
        torch.testing.assert_close(fn(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-5)
    records = [r for r in tilepass.report() if r.kind == "attention"]
    assert [(r.status, r.kernel) for r in records] == [("rewritten", "sdpa")] * 2, records
    assert len({r.compile_id for r in records}) == 2  # a static graph, then the symbolic one


# --- never a wrong result: constants keep torch's meaning (review of stop 9) -----------------

def _mask_case(kind):
    def f(q, k, v):
        b, s = q.shape[0], q.shape[2]
        ar = torch.arange(s)
        qi, ki = ar[None, None, :, None], ar[None, None, None, :]
        bi = torch.arange(b)[:, None, None, None]
        causal = ki <= qi
        if kind == "uint8 wraps":  # 255 + 1 is 0 in uint8: nothing is allowed
            mask = causal & ((torch.full((b, s), 255, dtype=torch.uint8)[bi, ki] + 1) != 0)
        elif kind == "float rounding":  # 0.1 * 3 != 0.3 in float32 too, but differently
            mask = causal & ((torch.full((b, s), 0.1)[bi, ki] * 3) != 0.3)
        elif kind == "int data times a float":  # folded 3 * 0.1 is float32 0.3 in torch, not Python's
            mask = causal & ((torch.full((b, s), 3)[bi, ki] * 0.1) != 0.3)
        elif kind == "int32 wraps":
            mask = causal & ((torch.full((b, s), 2**31 - 1, dtype=torch.int32)[bi, ki] + 1) < 0)
        elif kind == "int & True":  # an int & 1 keeps the low bit: odd distances only
            mask = causal & ((qi - ki) & qi.new_ones((), dtype=torch.bool)).bool()
        elif kind == "logical_and(int, True)":
            mask = causal & torch.logical_and((qi - ki) * 2 + 1, qi.new_ones((), dtype=torch.bool)) & (qi - ki < 3)
        elif kind == "uint8 positions":  # wrap past 255
            pos = torch.arange(s, dtype=torch.uint8).unsqueeze(0).expand(b, -1)
            mask = pos[bi, ki] <= pos[bi, qi]
        elif kind == "x.logical_and(True), int x":  # the method form keeps a tensor argument
            mask = causal & ((qi - ki) * 2 + 1).logical_and(qi.new_ones((), dtype=torch.bool)) & (qi - ki < 3)
        elif kind == "logical_and(x, folded int)":  # constant segment ids fold to the int 1
            mask = torch.logical_and(causal, torch.ones(b, s, dtype=torch.long)[bi, ki])
        elif kind == "add with alpha":  # torch.add(i, 3, alpha=2) is i + 6, not i + 3
            mask = torch.add(torch.arange(s), 3, alpha=2)[None, None, None, :] <= qi + 6
        elif kind in ("broadcast q", "broadcast kv"):  # a length-1 arange: the mask broadcasts
            qi = torch.arange(1)[None, None, :, None] if kind == "broadcast q" else qi
            ki = torch.arange(1)[None, None, None, :] if kind == "broadcast kv" else ki
            mask = ki <= qi
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return f


@pytest.mark.parametrize("kind", ["uint8 wraps", "float rounding", "int data times a float", "int32 wraps", "int & True", "logical_and(int, True)",
                                  "uint8 positions", "broadcast q", "broadcast kv", "x.logical_and(True), int x",
                                  "logical_and(x, folded int)", "add with alpha"])
def test_near_causal_masks_keep_their_meaning(kind):
    """Masks one fold away from plain causal: each is either routed with its exact meaning
    or left alone; none becomes SDPA's is_causal. (Each was a wrong result or a crash
    before its fix.)"""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 300 if kind == "uint8 positions" else 12, 16)
    gm, want, got, records = _rewrite_fn(_mask_case(kind), (q, q, q), attention=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert all(r.kernel != "sdpa" for r in records), [(r.status, r.pattern, r.kernel) for r in records]
    if kind.startswith("broadcast"):
        assert [r.status for r in records] == ["rejected"] and "broadcasts" in records[0].reason


@pytest.mark.parametrize("scale", [0.0, -0.25])
def test_eager_form_with_a_non_positive_scale_is_not_sent_to_sdpa(scale):
    """SDPA's kernels return NaN rows for scale <= 0 (a softmax over equal scores is not):
    such an eager-form site goes to flex, not to SDPA's causal kernel."""
    def f(q, k, v):
        s = q.shape[2]
        ar = torch.arange(s)
        allowed = torch.where(ar[None, None, None, :] <= ar[None, None, :, None], 0.0, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(2, 3) * scale + allowed, dim=-1) @ v

    q = torch.randn(2, 4, 8, 16)
    gm, want, got, records = _rewrite_fn(f, (q, q, q), attention=True)
    assert [(r.status, r.kernel) for r in records] == [("rewritten", "flex")]
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_scale_from_the_graph_is_declined_not_a_crash(routed_graph_on_aot_eager):
    """dynamic=True can make a module float (transformers' ``self.scaling``) a graph input,
    so SDPA's scale is a graph value: the site is left alone with the reason (before, the
    kernel choice compared a graph node with 0 and the compile failed). End to end, such a
    model compiles and matches eager."""
    from tilepass import passes
    from tilepass.options import Options

    def f(q, k, v, scale):
        i = torch.arange(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, None, None, :] <= i[None, None, :, None],
                                              scale=scale)

    q = torch.randn(2, 2, 12, 8)
    gm = fx.symbolic_trace(f, concrete_args={})

    class Fill(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            n.meta["example_value"] = v
            return v

    Fill(gm).run(q, q, q, 0.3)
    ctx = passes.PassContext(Options.parse(dict(attention=True)), 0)
    assert passes.run_passes(gm, ctx) == 0
    assert [r.reason for r in ctx.records] == [
        "the softmax scale is a value of the graph, not a constant (dynamic=True makes module floats graph inputs); "
        "use dynamic=None or False"]
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1).eval()
    ids = torch.randint(3, 128, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="tilepass", dynamic=True)(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_grad_turned_on_inside_a_no_grad_call_counts_as_training(routed_graph_on_aot_eager):
    """A compiled function called under no_grad that enables grad inside: its attention is
    trained, so a padded (flex) site is not routed on CPU (flex has no CPU backward), and
    the gradients equal eager's (it failed to compile before)."""
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1)
    ids = torch.randint(3, 128, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, :3] = 0

    def loss_fn(ids, am):
        with torch.enable_grad():
            return model(input_ids=ids, attention_mask=am, use_cache=False).logits[am.bool()].pow(2).mean()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="tilepass")):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = fn(ids, am)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not rewritten("attention") and rejected("attention")


@pytest.mark.parametrize("query_bytes,kv_heads,groups", [
    (256 * 2**20, 8, 4),   # Llama-3.2-1B at 64K tokens: 32 heads x 64K x 64 in bf16
    (64 * 2**20, 8, 1),    # 16K tokens: no split
    (2 * 2**30, 8, 8),     # 512K tokens: one group per key/value head, the most there are
    (100 * 2**20, 3, 3),   # groups divide the key/value heads
])
def test_default_head_groups(query_bytes, kv_heads, groups):
    from tilepass.options import default_head_groups

    assert default_head_groups(query_bytes, kv_heads) == groups


def test_attention_head_groups_train_exactly_with_save_attention(routed_graph_on_aot_eager):
    """attention_head_groups=2 on a checkpointed GQA layer (4 query heads, 2 key/value
    heads) with save_attention: the site runs as two SDPA calls, one per key/value head
    with its two query heads; output and every gradient equal eager at 1e-10 in float64."""
    from torch.utils.checkpoint import checkpoint

    from tilepass.attention_runtime import sdpa_head_groups

    torch.manual_seed(0)
    attn = _causal_attention(False)().double()
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 37, 32, dtype=torch.float64)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return tilepass.backend(attention_head_groups=2, save_attention=True)(gm, example_inputs)

    def f(x):
        return checkpoint(attn, x, use_reentrant=False)

    results = []
    for fn in (f, torch.compile(f, backend=keep)):
        out = fn(x)
        results.append((out, torch.autograd.grad((out * w).sum(), [x, *attn.parameters()])))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    [record] = rewritten("attention")
    assert (record.kernel, record.tiles) == ("sdpa", 2)
    assert [r.pattern for r in rewritten("checkpoint")] == ["save_attention"]
    calls = [n for gm in graphs for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
             if n.target is sdpa_head_groups]
    assert len(calls) == 1 and calls[0].kwargs["groups"] == 2 and calls[0].kwargs["enable_gqa"]


def test_plain_sdpa_is_split_over_head_groups_only_while_training():
    """A plain SDPA call (no mask) is left alone, unless it trains and groups are asked for;
    a group count that does not divide the key/value heads leaves it alone with the reason."""
    from tilepass.attention_runtime import sdpa_head_groups

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 19, 8), torch.randn(2, 3, 19, 8), torch.randn(2, 3, 19, 8)
    gm, want, got, records = _rewrite_fn(f, (q, k, v), attention=True, attention_head_groups=3)
    assert [r.status for r in records] == ["rejected"]  # no gradient flows: nothing to gain
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    gm, want, got, records = _rewrite_fn(f, (q, k, v), attention=True, attention_head_groups=3)
    assert [(r.status, r.kernel, r.tiles) for r in records] == [("rewritten", "sdpa", 3)]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [sdpa_head_groups]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad((sdpa_head_groups(q, k, v, groups=3, is_causal=True, scale=None, enable_gqa=True)
                                 * want).sum(), [q, k, v])
    for g, w in zip(grads, torch.autograd.grad((f(q, k, v) * want).sum(), [q, k, v])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    _, _, _, records = _rewrite_fn(f, (q, k, v), attention=True, attention_head_groups=2)
    assert [(r.status, r.reason) for r in records] == [
        ("rejected", "attention_head_groups=2 does not divide the 3 key/value heads (divisors: 1, 3)")]
