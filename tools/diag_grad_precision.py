"""Is a routed model's gradient mismatch precision or a bug? Compare both to float64.

    python tools/diag_grad_precision.py --arch gemma2 --impl eager [--pad]

Runs one training step of a tiny model three ways on the GPU: unrouted float32, routed
(tilepass, attention on) float32, and a float64 reference. For every parameter gradient it
prints the largest error of each float32 run against the reference. A routed error of the
size of the unrouted one is float32 precision; a larger one is a bug.

``--pad`` left-pads the second row. The reference then runs each row unpadded (its real
tokens at their positions) and weighs the two rows' gradients by their label counts: the
padded float64 eager forward of Gemma 2 is NaN (two ``finfo.min`` masks add to ``-inf``, whole
rows go NaN and spread through the values). Labels: the pads and the first real token are
-100. After the shift, the last pad predicts the first real token, and a query row with
every key masked differs by design (flex and SDPA: 0; the eager softmax: the mean of every
value), so that term would measure the convention, not the precision.
"""
from __future__ import annotations

import argparse
import copy

import torch

import tilepass
from tilepass.tiny_models import tiny_model


def grads(model, inputs, call=None):
    model.zero_grad(set_to_none=True)
    loss = (model if call is None else call)(**inputs).loss
    loss.backward()
    out = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), out


PAD = 37  # left pads of the second row


def reference(model64, inputs, padded: bool):
    """Float64 loss and gradients; a padded batch runs as its rows, each unpadded."""
    if not padded:
        return grads(model64, inputs)
    ids, labels = inputs["input_ids"], inputs["labels"]
    seq = ids.shape[1]
    rows = [dict(input_ids=ids[:1], labels=labels[:1]),
            dict(input_ids=ids[1:, PAD:], labels=labels[1:, PAD:],
                 position_ids=torch.arange(PAD, seq, device=ids.device)[None])]
    counts = [int((r["labels"][:, 1:] != -100).sum()) for r in rows]  # the loss is a mean over these
    results = [grads(model64, r) for r in rows]
    total = sum(counts)
    loss = sum(c * l for c, (l, _) in zip(counts, results)) / total
    return loss, {n: sum(c * g[n] for c, (_, g) in zip(counts, results)) / total for n in results[0][1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gemma2")
    p.add_argument("--impl", default="eager")
    p.add_argument("--pad", action="store_true")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--top", type=int, default=8, help="parameters to print, largest routed error first")
    args = p.parse_args(argv)
    model = tiny_model(args.arch, attn_implementation=args.impl).cuda()
    ids = torch.randint(3, 128, (2, args.seq), device="cuda")
    am = torch.ones_like(ids)
    am[1, :PAD] = 0
    labels = ids.clone()
    if args.pad:
        labels[1, :PAD + 1] = -100
    inputs = dict(input_ids=ids, attention_mask=am if args.pad else None, labels=labels)
    ref_loss, ref = reference(copy.deepcopy(model).double(), inputs, padded=args.pad)
    eager_loss, eager = grads(model, inputs)
    routed_loss, routed = grads(model, inputs, torch.compile(model, backend="tilepass", options=dict(attention=True)))
    print(f"loss: float64 {ref_loss:.8f}  eager f32 {eager_loss - ref_loss:+.2e}  routed f32 {routed_loss - ref_loss:+.2e}")
    print("routed:", [(r.module, r.kernel) for r in tilepass.report() if r.kind == "attention" and r.status == "rewritten"])
    rows = []
    for n, g in ref.items():
        scale = g.abs().max().item() or 1.0
        rows.append((n, scale, (eager[n] - g).abs().max().item(), (routed[n] - g).abs().max().item(),
                     (routed[n] - eager[n]).abs().max().item()))
    rows.sort(key=lambda r: -r[3])
    print(f"{'parameter':<48}{'max |g64|':>11}{'eager err':>11}{'routed err':>11}{'routed-eager':>13}")
    for n, scale, e, r, d in rows[:args.top]:
        print(f"{n[:47]:<48}{scale:>11.3e}{e:>11.3e}{r:>11.3e}{d:>13.3e}")


if __name__ == "__main__":
    main()
