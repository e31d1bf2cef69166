"""What the attention router sees on this machine: per site, the pattern, the kernel it
chose, and the lifted mask program (the mask_mod's code). One tiny compiled training step
of bench.py's dense stack with layer checkpointing; seconds on a GPU.

    python tools/diag_mask_program.py [--device cuda]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    import tilepass

    bargs = argparse.Namespace(model="dense", layers=2, seqs=[256], steps=1, dtype="float32", device=args.device, tiny=True)
    model = bench.build_model(bargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 32000, (1, 256), device=args.device)
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(input_ids=ids)
    torch._dynamo.reset()
    torch.compile(model, backend="tilepass")(input_ids=ids).last_hidden_state.sum().backward()
    print(f"torch {torch.__version__}, device {args.device}")
    for r in tilepass.report():
        if r.kind == "attention":
            print(f"{r.status} {r.module} pattern={r.pattern} kernel={r.kernel} reason={r.reason}")
    from tilepass.hop_inputs import BodyInputs
    from tilepass.match_attention import find_attention, is_plain_causal

    root = graphs[0]
    inputs = BodyInputs(root)
    for m in root.modules():
        if isinstance(m, torch.fx.GraphModule):
            sites, rejections = find_attention(m.graph, inputs.source if m is not root else None)
            for site in sites[:1]:
                print(f"--- {site.pattern}: plain causal = {site.mask is not None and is_plain_causal(site.mask)}")
                print(site.mask.program.code.strip() if site.mask is not None else "(no mask)")
            for r in rejections[:1]:
                print(f"--- rejected: {r.reason}")


if __name__ == "__main__":
    main()
