"""The LM head + cross-entropy as one tiled region (kind "loss"), against eager.

transformers computes the loss in float32 (``logits.float()`` in ``ForCausalLMLoss``) even
in a float64 model; the tiled loss adds its tiles' sums in float64 and rounds once, eager
adds in float32, so the loss *value* of those models matches to float32 rounding (a few
ulps: rtol 1e-6). Every gradient matches to 1e-10. Hand-written heads without the cast
match in everything to 1e-10.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilepass
from tilepass.tiny_models import tiny_model

from conftest import rejected, rewritten

EXACT = dict(rtol=1e-10, atol=1e-10)
F32_LOSS = dict(rtol=1e-6, atol=0.0)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels with ignored positions: a prompt prefix in row 0 and padding at the end of row 1."""
    labels = ids.clone()
    labels[0, :6] = -100
    labels[-1, -9:] = -100
    return labels


def _step(model, call, inputs, logit_weights=None, loss_scale=1.0):
    """(loss, logits, grads) of ``loss_scale * loss (+ a weighted sum of the logits)``; leaves no .grad."""
    model.zero_grad(set_to_none=True)
    out = call(**inputs)
    total = out.loss * loss_scale
    if logit_weights is not None:
        total = total + (out.logits * logit_weights).sum()
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), (None if out.logits is None else out.logits.detach()), grads


def _assert_grads(got, want):
    assert got.keys() == want.keys(), "parameters with a gradient differ"
    for name in want:
        torch.testing.assert_close(got[name], want[name], **EXACT, msg=lambda m, name=name: f"grad of {name}: {m}")


def _hf_model(arch, **overrides):
    experts = "batched_mm" if arch in tilepass.tiny_models.MOE_ARCHS else None  # grouped_mm has no float64
    model = tiny_model(arch, experts_implementation=experts, **overrides).double()
    return model


# (arch, what the case adds): every family builds from a tiny config; MoE ones add their aux loss.
HF_CASES = [
    ("llama", "logit_weights"),          # kept logits get their own gradient
    ("qwen3", "num_items_in_batch"),     # reduction="sum" then / num_items_in_batch, as Trainer calls it
    ("gemma2", "skip_logits"),           # final-logit softcap; logits dropped
    ("gpt2", "shift_labels"),            # tied LM head (Conv1D model); labels shifted by the caller
    ("mixtral", "plain"),                # router aux loss added to the loss
    ("qwen3_moe", "skip_logits"),
    ("phi3", "plain"),
    ("mistral", "loss_scale"),           # the loss gets a gradient other than 1/count
]


@pytest.mark.parametrize("arch,case", HF_CASES, ids=[f"{a}-{c}" for a, c in HF_CASES])
def test_hf_causal_lm_loss_matches_eager(arch, case):
    torch.manual_seed(0)
    model = _hf_model(arch, num_hidden_layers=1)  # the loss region is the point: one decoder layer
    ids = torch.randint(3, 128, (2, 37))
    labels = _labels(ids)
    inputs = dict(input_ids=ids, labels=labels)
    if case == "num_items_in_batch":
        inputs["num_items_in_batch"] = torch.tensor(int((labels[:, 1:] != -100).sum()))
    if case == "shift_labels":
        inputs["shift_labels"] = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    weights = torch.randn(2, 37, 128, dtype=torch.float64) if case == "logit_weights" else None
    scale = 0.37 if case == "loss_scale" else 1.0

    want = _step(model, model, inputs, weights, scale)
    compiled = torch.compile(model, backend="tilepass", options=dict(
        downstream="aot_eager", num_tiles=3, skip_logits=case == "skip_logits"))
    got = _step(model, compiled, inputs, weights, scale)

    [loss_record] = rewritten("loss")
    assert loss_record.module == "lm_head" and loss_record.tiles == 3
    torch.testing.assert_close(got[0], want[0], **F32_LOSS)
    if case == "skip_logits":
        assert got[1] is None and loss_record.logits_bytes == 0
    else:
        torch.testing.assert_close(got[1], want[1], **EXACT)
        assert loss_record.logits_bytes == 2 * 37 * 128 * 8  # [tokens, vocab] in the model's float64
    if case == "loss_scale":
        # Eager rounds (softmax - onehot) * 0.37 / count to float32 (the model's .float());
        # the tiled loss rounds (softmax - onehot) / count and scales by 0.37 in float64.
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-8)
    else:
        _assert_grads(got[2], want[2])


class Head(nn.Module):
    """A hand-written LM head + loss, float64 end to end (no cast to float32)."""

    def __init__(self, vocab=96, hidden=24, bias=False, tied=False, softcap=None, scaled=False,
                 smoothing=0.0, reduction="mean", matmul=False):
        super().__init__()
        self.vocab, self.softcap, self.smoothing, self.reduction = vocab, softcap, smoothing, reduction
        self.matmul = matmul
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.logit_scale = nn.Parameter(torch.tensor([1.3])) if scaled else None

    def forward(self, ids, labels, divisor=None):
        h = self.norm(self.embed(ids))
        logits = h @ self.lm_head.weight.t() if self.matmul else self.lm_head(h)  # [B, S, V]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), reduction=self.reduction,
                               label_smoothing=self.smoothing)
        return loss / divisor if divisor is not None else loss


HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "tied": dict(tied=True),
    "softcap": dict(softcap=3.0),
    "logit_scale": dict(scaled=True),
    "label_smoothing": dict(smoothing=0.1),
    "sum": dict(reduction="sum"),
    "matmul": dict(matmul=True),  # `h @ W.t()`: the head is a matmul, not F.linear
}


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("tiling", [dict(num_tiles=4), dict(tile_tokens=16)], ids=["4tiles", "16tokens"])
def test_hand_written_head_float64(name, tiling):
    torch.manual_seed(0)
    model = Head(**HEADS[name]).double()
    ids = torch.randint(0, 96, (2, 37))
    labels = _labels(ids)
    labels[1, :20] = -100  # with 16 tokens per tile, the 4th tile (rows 48..63) is all ignored

    def run(fn, scale):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels)
        (loss * scale).backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", **tiling))
    for scale in (1.0, 0.37):  # the expected gradient, and another one
        want, got = run(model, scale), run(compiled, scale)
        torch.testing.assert_close(got[0], want[0], **EXACT)
        _assert_grads(got[1], want[1])
    [record] = rewritten("loss")
    assert record.tiles == (4 if "num_tiles" in tiling else 5) and record.logits_bytes == 0


@pytest.mark.parametrize("fresh_thread", [False, True], ids=["in-place", "fresh-thread"])
def test_compiled_tile_float64(fresh_thread, monkeypatch):
    """loss_kernel="compiled": each tile's program runs through inductor (two tile shapes:
    16 tokens and a shorter last one), exact in float64 with a bias, softcap, a learned
    logit scale and label smoothing, for the expected gradient and another one. Both ways
    compat allows: compiled inside the custom op's kernel (CPU), or in a fresh thread (CUDA)."""
    monkeypatch.setattr(tilepass.compat, "compiled_tiles_need_fresh_thread", lambda device_type: fresh_thread)
    threads = []
    monkeypatch.setattr(tilepass.loss_runtime, "in_fresh_thread",
                        lambda *args, run=tilepass.loss_runtime.in_fresh_thread: threads.append(1) or run(*args))
    torch.manual_seed(0)
    model = Head(bias=True, softcap=3.0, scaled=True, smoothing=0.1).double()
    ids = torch.randint(0, 96, (2, 37))
    labels = _labels(ids)
    labels[1, :20] = -100

    def run(fn, scale):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels)
        (loss * scale).backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", tile_tokens=16,
                                                                      loss_kernel="compiled"))
    for scale in (1.0, 0.37):
        want, got = run(model, scale), run(compiled, scale)
        torch.testing.assert_close(got[0], want[0], **EXACT)
        _assert_grads(got[1], want[1])
    [record] = rewritten("loss")
    assert record.kernel == "compiled" and record.shown_pattern.endswith("-> compiled")
    region = tilepass.runtime.registered_region(record.region_key)
    assert region.compile_tile and region.compiled_fn is not None  # the tiles did run compiled
    assert bool(threads) == fresh_thread


def test_sum_divided_by_a_tensor_count():
    """Trainer's form: reduction="sum" then `/ num_items_in_batch` (a tensor computed elsewhere)."""
    torch.manual_seed(0)
    model = Head(reduction="sum").double()
    ids = torch.randint(0, 96, (2, 37))
    labels = _labels(ids)
    n = (labels != -100).sum()
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=3))
    want = torch.autograd.grad(model(ids, labels, n), list(model.parameters()))
    got = torch.autograd.grad(compiled(ids, labels, n), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)
    assert len(rewritten("loss")) == 1


def test_no_grad_keeps_logits_and_loss():
    """Where no gradient flows, skip_logits keeps the logits (eval wants them) and the loss is exact."""
    torch.manual_seed(0)
    model = _hf_model("llama").eval()
    ids = torch.randint(3, 128, (2, 21))
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=2, skip_logits=True))
    with torch.no_grad():
        want, got = model(input_ids=ids, labels=ids), compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.loss, want.loss, **F32_LOSS)
    torch.testing.assert_close(got.logits, want.logits, **EXACT)
    assert rewritten("loss")[0].logits_bytes > 0


def test_dynamic_sequence_length():
    torch.manual_seed(0)
    model = Head().double()
    compiled = torch.compile(model, backend="tilepass", dynamic=True, options=dict(downstream="aot_eager", num_tiles=3))
    for seq in (29, 41):
        ids = torch.randint(0, 96, (2, seq))
        labels = _labels(ids)
        want = torch.autograd.grad(model(ids, labels), list(model.parameters()))
        got = torch.autograd.grad(compiled(ids, labels), list(model.parameters()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **EXACT)
    assert rewritten("loss")


class _Variant(Head):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, ids, labels):
        h = self.norm(self.embed(ids))
        logits = self.lm_head(h).view(-1, self.vocab)
        if self.kind == "class_weights":
            return F.cross_entropy(logits, labels.view(-1), weight=torch.linspace(0.5, 1.5, self.vocab, dtype=logits.dtype))
        if self.kind == "none":
            return F.cross_entropy(logits, labels.view(-1), reduction="none").mean()
        if self.kind == "token_mixing":  # the logits read another token tensor on the way
            return F.cross_entropy(logits + logits.flip(0), labels.view(-1))
        if self.kind == "probabilities":
            return F.cross_entropy(logits, F.one_hot(labels.view(-1).clamp(min=0), self.vocab).to(logits.dtype))
        raise AssertionError(self.kind)


REJECTED = {
    "class_weights": "class weights",
    "none": "reduction='none'",
    "token_mixing": "reads 2 token tensors",
    "probabilities": "not one class index per row",
}


@pytest.mark.parametrize("kind", list(REJECTED))
def test_near_misses_are_left_with_a_reason(kind):
    torch.manual_seed(0)
    model = _Variant(kind).double()
    ids = torch.randint(0, 96, (2, 37))
    labels = ids.clone()
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=3))
    want = torch.autograd.grad(model(ids, labels), list(model.parameters()))
    got = torch.autograd.grad(compiled(ids, labels), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)
    assert not rewritten("loss")
    [record] = rejected("loss")
    assert REJECTED[kind] in record.reason, record.reason


def test_graph_break_is_recorded(monkeypatch):
    """A graph break between the LM head and the loss: the loss runs in a graph of its own,
    with the logits as an input; the record says so and how to find the break. (GPT-2's
    warning in `loss_function` made this break before tilepass let Dynamo trace
    transformers' warning_once; see test_gpt2_loss_is_one_graph_with_its_head.)"""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss_after_a_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return ForCausalLMLoss(*args, **kwargs)

    torch.manual_seed(0)
    model = tiny_model("gpt2").double()
    monkeypatch.setattr(type(model), "loss_function", property(lambda self: loss_after_a_break))
    ids = torch.randint(3, 128, (2, 21))
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=2))
    torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss, **F32_LOSS)
    [record] = rejected("loss")
    assert "input of this graph" in record.reason and "TORCH_LOGS=graph_breaks" in record.reason


def test_gpt2_loss_is_one_graph_with_its_head():
    """GPT2LMHeadModel's name does not say ForCausalLM, so transformers logs a warning_once in
    `loss_function`; with tilepass imported Dynamo traces through it, and the loss is tiled
    with the LM head as shipped (no `loss_type` override)."""
    torch.manual_seed(0)
    model = tiny_model("gpt2").double()
    ids = torch.randint(3, 128, (2, 21))
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=2))
    torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss, **F32_LOSS)
    assert len(rewritten("loss")) == 1 and not rejected("loss")


def test_loss_option_switches_the_pass_off():
    model = Head().double()
    ids = torch.randint(0, 96, (2, 9))
    torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", loss=False))(ids, ids)
    assert not rewritten("loss") and not rejected("loss")


@pytest.mark.parametrize("key", ["loss", "skip_logits"])
def test_bad_values_name_the_option(key):
    with pytest.raises(tilepass.OptionsError, match=key):
        tilepass.Options.parse({key: "yes"})


def test_default_tiles_follow_vocab_over_hidden():
    """Derived default: ceil(vocab / hidden) tiles, one tile's logits about the region input's elements."""
    model = Head(vocab=96, hidden=24).double()
    ids = torch.randint(0, 96, (2, 37))
    torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager"))(ids, ids)
    assert rewritten("loss")[0].tiles == 4


# --- memory: what survives AOTAutograd + inductor ------------------------------------

MEM_TOKENS, MEM_HIDDEN, MEM_VOCAB = 1024, 32, 4096


class CastHead(Head):
    """transformers' form: logits in the model's dtype, a float32 copy for the loss."""

    def forward(self, ids, labels):
        logits = self.lm_head(self.norm(self.embed(ids)))
        loss = F.cross_entropy(logits.float().view(-1, self.vocab), labels.view(-1))
        return loss, logits


def _saved_for_backward(fn, model, *inputs):
    """Shapes of what autograd keeps from ``fn`` (parameters excluded), deduplicated by storage."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, torch.Size] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fn(*inputs)
    loss.backward()
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("skip_logits", [False, True], ids=["logits_kept", "skip_logits"])
def test_logits_are_not_saved_under_inductor(skip_logits):
    torch.manual_seed(0)
    model = CastHead(vocab=MEM_VOCAB, hidden=MEM_HIDDEN).to(torch.bfloat16)
    ids = torch.randint(0, MEM_VOCAB, (1, MEM_TOKENS))
    # [tokens, vocab] over the whole sequence (a tile's [tile, vocab] tensors, saved by the
    # autograd that runs inside the tiled op for one tile, are freed with that tile)
    wide = lambda shapes: [s for s in shapes if s and s[-1] == MEM_VOCAB and s.numel() >= MEM_TOKENS * MEM_VOCAB]  # noqa: E731

    plain = _saved_for_backward(torch.compile(model, backend="inductor"), model, ids, ids)
    assert wide(plain), plain  # inductor alone keeps the [tokens, vocab] log-softmax for the backward
    tilepass.reset()
    tiled = torch.compile(model, backend="tilepass", options=dict(num_tiles=8, skip_logits=skip_logits))
    shapes = _saved_for_backward(tiled, model, ids, ids)
    assert len(rewritten("loss")) == 1
    assert not wide(shapes), shapes  # neither the logits nor their float32 copy
    # what is kept: the LM head's input gradient [tokens, hidden] (and, with the logits kept,
    # the head's input for their own backward), the weight's gradient, and scalars
    assert all(s.numel() <= MEM_VOCAB * MEM_HIDDEN or s[0] == MEM_TOKENS // 8 for s in shapes), shapes


_RSS_SCRIPT = r"""
import resource, sys, threading, time, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
torch.set_num_threads(1)
N, H, V = 1024, 32, 65536  # one [N, V] float32 tensor: 256 MiB
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.embed = nn.Embedding(V, H); self.lm_head = nn.Linear(H, V, bias=False)
    def forward(self, ids, labels):
        logits = self.lm_head(self.embed(ids))
        return F.cross_entropy(logits.float().view(-1, V), labels.view(-1)), logits
model = M()
if sys.argv[1] == "tilepass":
    import tilepass
    fn = torch.compile(model, backend="tilepass", options=dict(num_tiles=32, skip_logits=True))
else:
    fn = torch.compile(model, backend="inductor")
ids = torch.randint(0, V, (1, N))
def step():
    model.zero_grad(set_to_none=False)
    loss, logits = fn(ids, ids)
    del logits
    loss.backward()
step()  # compile, and allocate the parameters' gradients
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
base = rss(); t = threading.Thread(target=sample); t.start()
step(); done[0] = True; t.join()
print(max(peak[0], rss()) - base)
"""


@pytest.mark.slow
def test_step_rss_with_skip_logits_is_a_fraction_of_inductor(tmp_path):
    """A CPU step's resident-memory rise (sampled), large vocabulary, fresh processes."""
    import subprocess
    import sys

    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)

    def rise(variant):
        out = subprocess.run([sys.executable, str(script), variant], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    plain, tiled = rise("inductor"), rise("tilepass")
    print(f"step RSS rise: inductor {plain / 2**20:.0f} MiB, tilepass skip_logits {tiled / 2**20:.0f} MiB")
    assert plain > 2 * 256 * 2**20  # at least two [tokens, vocab] float32 tensors
    assert tiled < plain / 8, (tiled, plain)


def test_default_loss_tiles_bound_one_tiles_float32_logits():
    from tilepass.options import LOSS_TILE_LOGITS_BYTES, default_loss_tiles

    assert default_loss_tiles(65536, 2048, 128256) == 63  # ceil(vocab / hidden): 1,041 tokens a tile
    tiles = default_loss_tiles(1 << 20, 2048, 128256)  # 1M tokens: the byte bound takes over
    assert tiles == -(-(1 << 20) * 128256 * 4 // LOSS_TILE_LOGITS_BYTES) == 1002  # 1,046-1,047 tokens a tile
    assert default_loss_tiles(5, 64, 4096) == 5  # at most one tile per token


class ZLossHead(Head):
    """A z-loss next to the cross-entropy (PaLM's): it reads the full logits outside the loss."""

    def forward(self, ids, labels):
        logits = self.lm_head(self.norm(self.embed(ids))).view(-1, self.vocab)
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return F.cross_entropy(logits, labels.view(-1)) + 1e-2 * z


def test_z_loss_keeps_the_logits_it_reads():
    """The cross-entropy is tiled; the z-loss reads the logits, so the graph keeps its own LM
    head for it (even with skip_logits: they are not the model's returned logits) and the
    record says what they cost. Gradients stay exact."""
    torch.manual_seed(0)
    model = ZLossHead().double()
    ids = torch.randint(0, 96, (2, 37))
    labels = _labels(ids)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=3, skip_logits=True))
    want = torch.autograd.grad(model(ids, labels), list(model.parameters()))
    got = torch.autograd.grad(compiled(ids, labels), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)
    [record] = rewritten("loss")
    assert record.logits_bytes == 2 * 37 * 96 * 8


def test_accumulate_fp32_never_narrows_float64():
    """accumulate_fp32 widens bf16/fp16 gradients; a float64 one stays float64 (exact)."""
    torch.manual_seed(0)
    model = Head(bias=True).double()
    ids = torch.randint(0, 96, (2, 37))
    labels = _labels(ids)
    compiled = torch.compile(model, backend="tilepass", options=dict(downstream="aot_eager", num_tiles=5,
                                                                    accumulate_fp32=True))
    want = torch.autograd.grad(model(ids, labels), list(model.parameters()))
    got = torch.autograd.grad(compiled(ids, labels), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled tile is the default there")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-4, atol=1e-5)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))],
                         ids=["float32", "bfloat16"])
def test_cuda_compiled_tiles_match_eager(dtype, tol):
    """On CUDA the loss tiles run compiled by default (triton kernels); the loss and every
    gradient match eager transformers within the dtype's tolerance, and the eager-kernel
    tiles (loss_kernel="eager") agree with them."""
    torch.manual_seed(0)
    model = tiny_model("llama").to("cuda", dtype)
    ids = torch.randint(3, 128, (2, 37), device="cuda")
    inputs = dict(input_ids=ids, labels=_labels(ids))
    want = _step(model, model, inputs)
    for kernel in ("auto", "eager"):
        tilepass.reset()
        got = _step(model, torch.compile(model, backend="tilepass", options=dict(num_tiles=3, loss_kernel=kernel)), inputs)
        [record] = rewritten("loss")
        assert record.kernel == ("compiled" if kernel == "auto" else None)
        torch.testing.assert_close(got[0], want[0], **tol)
        for name in want[2]:
            torch.testing.assert_close(got[2][name].float(), want[2][name].float(), **tol,
                                       msg=lambda m, name=name: f"{kernel}: grad of {name}: {m}")
