"""``tilepass dump`` and ``tilepass explain``: see what tilepass does to a model, no code.

    tilepass dump --arch llama --seq 64 --batch 2 --out tilepass_dump
    tilepass dump --config path/to/config.json --eval
    tilepass explain --arch mixtral --experts grouped_mm
    tilepass explain --arch llama --checkpoint --downstream inductor --option save_attention=true

The model is built from its config (no weights are downloaded), runs one forward (and
backward with ``--train``, the default) under the backend, and a table of what was tiled
is printed. ``dump`` also writes the dump folder (see :mod:`tilepass.dump`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def build_model(args):
    import torch
    import transformers

    from .tiny_models import tiny_model

    if args.config:
        path = pathlib.Path(args.config)
        if path.is_dir():
            config = transformers.AutoConfig.from_pretrained(str(path))
        else:
            data = json.loads(path.read_text())
            config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        extra = {"experts_implementation": args.experts} if args.experts else {}
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, **extra)
    else:
        model = tiny_model(args.arch, experts_implementation=args.experts)
    dtype = getattr(torch, args.dtype)
    return model.to(dtype).train(args.train)


def _options(args) -> dict:
    options = dict(downstream=args.downstream)
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = _parse_value(value)
    return options


def run(args) -> list:
    import torch

    import tilepass

    model = build_model(args)
    if args.checkpoint:  # layers become tag_activation_checkpoint bodies, as in long-context training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = _options(args)
    tilepass.Options.parse(options)  # a bad option fails here, not wrapped by Dynamo
    tilepass.reset()
    compiled = torch.compile(model, backend="tilepass", options=options)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(args.train):
        out = compiled(input_ids=ids, labels=ids)
        if args.train:
            out.loss.backward()
    return tilepass.report()


def _passes_off(args) -> list[str]:
    """One line per pass the options switched off, so an empty row is not mistaken for 'nothing found'."""
    from .options import Options
    from .passes import PASSES

    opts = Options.parse(_options(args))
    lines = []
    for name, (_, switch) in PASSES.items():
        opt_in = Options.__dataclass_fields__[switch].default is False  # off unless asked: not news
        if not opts.enabled(switch) and not opt_in:
            why = (f"downstream={opts.downstream!r}; flex attention is only fast under inductor, add --downstream inductor"
                   if switch == "attention" and opts.attention is None else f"{switch}={getattr(opts, switch)!r}")
            lines.append(f"pass {name}: off ({why})")
    return lines


def table(records: list) -> str:
    from .report import logits_note

    if not records:
        return "no candidate regions found"
    rows = [("status", "kind", "module", "pattern", "tiles", "saved MiB", "reason")]
    for r in records:
        saved = f"{r.saved_bytes / 2**20:.2f}" if r.saved_bytes is not None else ""
        rows.append((r.status, r.kind, r.module or "<root>", r.shown_pattern, str(r.tiles or ""), saved,
                     r.reason or logits_note(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .tiny_models import ARCHS, MOE_ARCHS

    parser = argparse.ArgumentParser(prog="tilepass", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("dump", "write a dump of every compiled graph and print what was tiled"),
                            ("explain", "print what was tiled and why candidates were left alone")):
        p = sub.add_parser(name, help=help_text)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--arch", choices=ARCHS + MOE_ARCHS, default="llama", help="a built-in tiny config")
        src.add_argument("--config", help="a local config.json (or a folder holding one)")
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--batch", type=int, default=2)
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--train", dest="train", action="store_true", default=True, help="forward + backward (default)")
        mode.add_argument("--eval", dest="train", action="store_false", help="forward only, eval mode")
        p.add_argument("--experts", choices=["grouped_mm", "batched_mm", "eager"], default=None,
                       help="transformers experts implementation for MoE models")
        p.add_argument("--checkpoint", action="store_true",
                       help="layer activation checkpointing (use_reentrant=False), as long-context training runs; "
                            "with --option save_attention=true the layers keep attention's outputs")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--downstream", default="aot_eager", help="tilepass downstream compiler (default aot_eager: fast)")
        p.add_argument("--option", action="append", metavar="KEY=VALUE", help="another tilepass option, e.g. num_tiles=4")
        if name == "dump":
            p.add_argument("--out", default="tilepass_dump", help="dump folder (default ./tilepass_dump)")
    args = parser.parse_args(argv)

    from . import OptionsError, dump

    try:
        if args.command == "dump":
            with dump(args.out) as root:
                records = run(args)
        else:
            records = run(args)
    except OptionsError as e:
        print(f"tilepass: {e}", file=sys.stderr)
        return 2
    print(table(records))
    off = _passes_off(args)
    if off:
        print("\n" + "\n".join(off))
    if args.command == "dump":
        folders = sorted(p.name for p in pathlib.Path(root).iterdir() if p.is_dir())
        print(f"\ndump written to {root}/ ({', '.join(folders)}): open graph.html in a browser, diff the stage_*.py files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
