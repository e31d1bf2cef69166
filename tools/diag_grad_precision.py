"""Is a routed model's gradient mismatch precision or a bug? Compare both to float64.

    python tools/diag_grad_precision.py --arch gemma2 --impl eager --force-softcap

``--force-softcap`` routes softcapped sites while training, which tilepass declines
(``passes.SOFTCAP_IN_TRAINING``) until this question is settled. Without ``--pad``: Gemma 2's
float64 eager forward turns NaN on padded batches (on CPU too: two ``finfo.min`` masks add to
``-inf``, whole rows go NaN and spread through the values), so the reference needs an
unpadded batch.

Runs one training step of a tiny model three ways on the GPU: unrouted float32, routed
(tilepass, attention on) float32, and unrouted float64 (the reference). For every parameter
gradient it prints the largest error of each float32 run against the reference. A routed
error of the size of the unrouted one is float32 precision; a larger one is a bug.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gemma2")
    p.add_argument("--impl", default="eager")
    p.add_argument("--pad", action="store_true")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--top", type=int, default=8, help="parameters to print, largest routed error first")
    p.add_argument("--force-softcap", action="store_true", help="route softcapped sites while training")
    args = p.parse_args(argv)
    if args.force_softcap:
        from tilepass import passes

        checks = passes._not_routable_here

        def without_softcap_check(site, *rest):
            reason = checks(site, *rest)
            return None if reason == passes.SOFTCAP_IN_TRAINING else reason

        passes._not_routable_here = without_softcap_check
    model = tiny_model(args.arch, attn_implementation=args.impl).cuda()
    ids = torch.randint(3, 128, (2, args.seq), device="cuda")
    am = torch.ones_like(ids)
    am[1, :37] = 0
    inputs = dict(input_ids=ids, attention_mask=am if args.pad else None,
                  labels=ids.masked_fill(am == 0, -100) if args.pad else ids)
    ref_loss, ref = grads(copy.deepcopy(model).double(), inputs)
    eager_loss, eager = grads(model, inputs)
    routed_loss, routed = grads(model, inputs, torch.compile(model, backend="tilepass", options=dict(attention=True)))
    print(f"loss: float64 {ref_loss:.8f}  eager f32 {eager_loss - ref_loss:+.2e}  routed f32 {routed_loss - ref_loss:+.2e}")
    if ref_loss != ref_loss:
        print("the float64 reference is NaN (a padded batch? see the module docstring): compare routed-eager only")
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
