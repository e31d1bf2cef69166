import os

# pytest-xdist runs one worker per core (`-n 2` on the README's 2-core machine): each worker
# and each process a test starts (torchrun ranks, tools/bench.py, `python -m tilepass`) then
# gets its share of the cores as its OpenMP/intra-op threads. By default every one of them
# takes all the cores, and OpenMP threads spinning on an oversubscribed machine cost about a
# quarter of the suite's CPU time. Set before torch is imported; OMP_NUM_THREADS set by hand wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402
import torch  # noqa: E402

import tilepass  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _fresh_tilepass():
    tilepass.reset()
    yield
    tilepass.reset()


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


def assert_close_results(got, want, rtol, atol, what=""):
    (loss, logits, grads), (rloss, rlogits, rgrads) = got, want
    torch.testing.assert_close(loss, rloss, rtol=max(rtol, LOSS_RTOL), atol=atol, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(logits, rlogits, rtol=rtol, atol=atol, msg=lambda m: f"{what} logits: {m}")
    assert grads.keys() == rgrads.keys(), f"{what}: parameters with a gradient differ"
    for name in rgrads:
        torch.testing.assert_close(grads[name], rgrads[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} grad of {name}: {m}")


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
