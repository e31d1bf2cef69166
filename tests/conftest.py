import os

# pytest-xdist runs one worker per core (`-n 2` on the README's 2-core machine): each worker
# and each process a test starts (torchrun ranks, tools/bench.py, `python -m tilepass`) then
# gets its share of the cores as its OpenMP/intra-op threads. By default every one of them
# takes all the cores, and OpenMP threads spinning on an oversubscribed machine cost about a
# quarter of the suite's CPU time. Set before torch is imported; OMP_NUM_THREADS set by hand wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

# Inductor's CPU code without SIMD: the suite tests the graphs tilepass hands inductor, what
# inductor's partitioner saves for the backward and the numbers that come out, not inductor's
# vectorizer (on GPU it emits Triton, not this C++). Vectorized C++ kernels take twice as long
# to generate and compile here: a tiny Llama's training step compiled by inductor and by
# tilepass+inductor, 49 s with them and 23 s without, on 2 cores. Exported, so the processes
# tests start inherit it; a value set by hand wins (TORCHINDUCTOR_VEC_ISA_OK=1 runs the suite
# with vectorized kernels). Tests marked `simd` (inductor's CPU flex-attention template has no
# scalar form) run in a pytest process of their own with the vector ISA on
# (pytest_pyfunc_call below): switched inside one process, code generated for one setting
# was compiled for the other.
_SIMD_CHILD = os.environ.get("TILEPASS_TEST_SIMD") == "1"
if not _SIMD_CHILD:
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import tilepass  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_finish(session):
    """Cheaper garbage collection for a suite that is mostly Dynamo + AOTAutograd tracing,
    which allocates millions of short-lived objects per compile: everything imported so far
    (torch, transformers) is never garbage, so full collections skip it (gc.freeze), and
    young collections run every 10,000 allocations instead of 700. Measured on 16 aot_eager
    tests: time in the collector 4.9 s -> 2.7 s of about 38 s."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


@pytest.fixture(autouse=True)
def _fresh_tilepass():
    tilepass.reset()
    yield
    tilepass.reset()


def pytest_pyfunc_call(pyfuncitem):
    """A test marked simd, in a SIMD-free process: run it in a child pytest with inductor's
    vector ISA on, and pass or fail with it."""
    if pyfuncitem.get_closest_marker("simd") is None or _SIMD_CHILD or os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") != "0":
        return None
    import subprocess
    import sys

    env = dict(os.environ, TILEPASS_TEST_SIMD="1")
    env.pop("TORCHINDUCTOR_VEC_ISA_OK")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pyfuncitem.config.rootpath, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} (vector ISA on) failed:\n{res.stdout[-6000:]}{res.stderr[-2000:]}"
    return True


@pytest.fixture
def routed_graph_on_aot_eager(request, monkeypatch):
    """For routing tests where inductor's kernels are not what is under test: tilepass decides
    everything as for downstream='inductor' (the only downstream that routes attention), then
    hands the rewritten graph to aot_eager, which runs flex attention through its eager
    implementation. A case marked simd keeps inductor: the same rewrites, compiled."""
    if request.node.get_closest_marker("simd") is not None:
        return
    import importlib

    module = importlib.import_module("tilepass.backend")  # the module; tilepass.backend is the function
    compile_downstream = module.compile_downstream

    def on_aot_eager(gm, example_inputs, downstream, mode, patches=None):
        return compile_downstream(gm, example_inputs, "aot_eager" if downstream == "inductor" else downstream, mode, patches)

    monkeypatch.setattr(module, "compile_downstream", on_aot_eager)


# transformers computes the loss in float32 (`logits.float()`), also in a float64 model; the
# tiled loss region adds its tiles' sums in another order than eager's float32 sum, so the
# loss *value* is compared at float32 rounding. Logits and every gradient keep the test's own
# tolerance (tests/test_loss.py).
LOSS_RTOL = 1e-6


def train_step(model, inputs, logit_weights, call=None):
    """Loss + a weighted sum of the logits (non-uniform upstream gradients) through
    ``call`` (default: ``model``); returns (loss, logits, {param name: grad of model's
    parameter}) and leaves no .grad behind."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(**inputs)
    loss = out.loss + (out.logits * logit_weights).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), out.logits.detach(), grads


def assert_close_results(got, want, rtol, atol, what="", atol_of_scale=0.0):
    """Loss, logits and every gradient close; ``atol_of_scale`` adds that fraction of each
    reference tensor's largest magnitude to ``atol`` (float32 rounding inside a float64 model
    scales with the tensor, test_hf_models.py)."""
    (loss, logits, grads), (rloss, rlogits, rgrads) = got, want

    def close(a, b, rtol, msg):
        tol = atol + atol_of_scale * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=tol, msg=lambda m: f"{what} {msg}: {m}")

    close(loss, rloss, max(rtol, LOSS_RTOL), "loss")
    close(logits, rlogits, rtol, "logits")
    assert grads.keys() == rgrads.keys(), f"{what}: parameters with a gradient differ"
    for name in rgrads:
        close(grads[name], rgrads[name], rtol, f"grad of {name}")


def rewritten(kind="mlp"):
    return [r for r in tilepass.report() if r.status == "rewritten" and r.kind == kind]


def rejected(kind="mlp"):
    return [r for r in tilepass.report() if r.status == "rejected" and r.kind == kind]


def checkpointed_llama_step():
    """A float64 tiny Llama with layer checkpointing (the benchmark's setting) and one
    training step's inputs: (model, inputs, logit weights); batch 2, length 37."""
    from tilepass.tiny_models import tiny_model

    model = tiny_model("llama", attn_implementation="sdpa").double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 37))
    weights = torch.randn(2, 37, 128, dtype=torch.float64)
    return model, dict(input_ids=ids, labels=ids), weights
