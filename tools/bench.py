"""Peak memory and step time of a decoder stack: eager vs inductor vs Liger vs tilepass.

One process runs every variant at every sequence length, one after the other, and prints
one JSON line per measurement (and a table at the end):

    python tools/bench.py --layers 4 --seqs 16384 32768 65536 --out docs/results/bench.json
    python tools/bench.py --model moe --layers 4 --seqs 16384 32768 --variants eager,compile,tilepass
    python tools/bench.py --variants tilepass@4096,tilepass@16384 --seqs 65536      # tile sweep
    python tools/bench.py --tiny --device cpu --seqs 64 --steps 1                    # CPU smoke test

Models are built from config (no weights): ``dense`` is a transformers ``LlamaModel`` with
Llama-3.2-1B shapes (hidden 2048, intermediate 8192, 32/8 heads); ``causal`` the same as a
``LlamaForCausalLM`` (vocabulary 128,256) trained as users train it,
``model(input_ids, labels=input_ids).loss``; ``moe`` a ``Qwen3MoeModel`` with
Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32/4 heads,
grouped_mm experts). bf16, batch 1, SDPA attention; ``dense`` and ``moe`` take a loss on
the final hidden states. ``--ckpt on`` enables layer activation checkpointing; ``--lora``
wraps the model in PEFT LoRA (r 16 on every linear layer, base frozen); ``--downstream``
picks what compiles the tilepass variants' graphs after its passes (inductor by default, as
users run it; attention is routed only under inductor).

Variants: ``eager``; ``compile`` (torch.compile, inductor); ``liger`` (eager, every MLP
replaced by Liger-Kernel's ``LigerTiledSwiGLUMLP``, the DeepSpeed/ALST TiledMLP
algorithm; ``causal`` adds Liger's fused linear cross-entropy, as its users run it);
``cce`` (``causal`` only: Apple's Cut Cross-Entropy on the final hidden states, logits never
in global memory, + Liger's tiled MLPs); ``tilepass-mlp`` (MLP/MoE tiling alone, attention as transformers
writes it); ``tilepass`` (the defaults: tiling, and attention routed: a plain causal mask to
SDPA's fused kernels, others to flex); ``tilepass+flex`` (every attention site to flex
attention); ``tilepass+save`` (the defaults with ``save_attention``: checkpointed layers
keep attention's outputs instead of recomputing attention); ``tilepass+skip`` and
``tilepass+save+skip`` (``skip_logits``: the returned logits are None, as with Liger's fused
cross-entropy; ``causal`` only) and ``tilepass+saveN+skip`` (N = 1, 2, 3: attention's outputs
kept in the last N layers only; ``+8-groups``: SDPA in 8 groups of heads), with the controls ``tilepass+skip+1-group`` (SDPA in one
call per site, ``attention_head_groups=1``) and ``tilepass+skip+eager-loss`` (the loss tiles
on eager kernels, ``loss_kernel="eager"``); ``tilepass+save-nothing`` (its
control: the policy installed, keeping nothing); any tilepass variant with
``@N``: N tokens per tile. Any variant with ``+cudnn`` last (``eager+cudnn``,
``tilepass+save+cudnn``) runs with SDPA restricted to its cuDNN kernel (CUDA only): the
compiled graph then holds cuDNN attention, picked when it is traced, so a row proves the
kernel ran (SDPA raises where cuDNN cannot take the call).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

# tilepass variants: the options each one passes (the rest are the defaults)
TILEPASS_VARIANTS = {
    "tilepass-mlp": dict(attention=False),  # MLP/MoE tiling alone; attention left as transformers writes it
    "tilepass": {},  # the defaults: tiling, and attention routed (plain causal to SDPA's fused kernels)
    "tilepass+flex": dict(attention_kernel="flex"),  # every routed attention site to flex attention
    "tilepass+save": dict(save_attention=True),  # checkpointed layers keep attention's outputs
    "tilepass+skip": dict(skip_logits=True),  # causal: the loss region returns no logits
    "tilepass+save+skip": dict(save_attention=True, skip_logits=True),
    # attention's outputs kept in the last 1, 2 or 3 layers only: between +skip and +save+skip
    **{f"tilepass+save{n}+skip": dict(save_attention=n, skip_logits=True) for n in (1, 2, 3)},
    # ... and with SDPA in 8 groups of heads (half of cuDNN's work block per call at 64K)
    "tilepass+save2+skip+8-groups": dict(save_attention=2, skip_logits=True, attention_head_groups=8),
    "tilepass+save+skip+8-groups": dict(save_attention=True, skip_logits=True, attention_head_groups=8),
    # controls for tilepass+skip, one lever off each: SDPA in one call per site (no head
    # groups), and the loss tiles on eager kernels (not compiled)
    "tilepass+skip+1-group": dict(skip_logits=True, attention_head_groups=1),
    "tilepass+skip+eager-loss": dict(skip_logits=True, loss_kernel="eager"),
    # a control for tilepass+save: the same policy installed, keeping nothing. Before torch
    # 2.13 any policy moves a checkpointed layer onto the selective-checkpoint path; this
    # row shows what that move alone does, apart from the outputs kept
    "tilepass+save-nothing": dict(save_attention=True),
}
KEEPS_NOTHING = "tilepass+save-nothing"
VARIANTS = ("eager", "compile", "liger", "cce", *TILEPASS_VARIANTS)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
CUDNN = "+cudnn"  # a modifier of any variant: SDPA on cuDNN's kernel alone
_SAVED_OPS: dict = {}  # the real checkpoint_policy.saved_attention_ops, kept on first use


def build_model(args):
    import transformers

    common = dict(num_hidden_layers=args.layers, vocab_size=vocab_size(args), max_position_embeddings=max(args.seqs),
                  attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    if args.model == "moe":
        if args.tiny:
            shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
        else:
            shape = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                         head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
        cfg = transformers.Qwen3MoeConfig(**shape, **common, output_router_logits=False)
        model = transformers.Qwen3MoeModel._from_config(cfg, experts_implementation="grouped_mm")
    else:
        if args.tiny:
            shape = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        else:
            shape = LLAMA_1B
        cls = transformers.LlamaForCausalLM if args.model == "causal" else transformers.LlamaModel
        model = cls(transformers.LlamaConfig(**shape, **common))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        # MoE: the attention projections by name. PEFT's "all-linear" would also adapt the router
        # and the fused experts through torch.nn.utils.parametrize, which sends the whole decoder
        # loop to eager under Dynamo (README, Limitations).
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if args.model == "moe" else "all-linear"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return model


def vocab_size(args) -> int:
    """Llama-3's 128,256 for the causal model (its LM head is the point), else 32,000 (unused)."""
    return 256 if args.tiny else (128256 if args.model == "causal" else 32000)


def _decoder(model):
    """The module holding ``.layers`` (under a causal LM, and under PEFT's wrappers)."""
    while not hasattr(model, "layers"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.model
    return model


_UNDO: list = []  # what a variant changed on the shared model, undone after its row


def with_liger_mlps(model):
    """``model`` with every MLP swapped for Liger's LigerTiledSwiGLUMLP (same weights), in
    place, so that no second copy of the model sits in memory; undone by :func:`undo_variant`."""
    from liger_kernel.transformers.tiled_mlp import LigerTiledSwiGLUMLP

    for layer in _decoder(model).layers:
        mlp, w = layer.mlp, layer.mlp.gate_proj.weight
        liger = LigerTiledSwiGLUMLP(_decoder(model).config).to(device=w.device, dtype=w.dtype)
        liger.gate_proj, liger.up_proj, liger.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj  # shared weights
        layer.mlp = liger
        _UNDO.append(lambda layer=layer, mlp=mlp: setattr(layer, "mlp", mlp))
    return model


def undo_variant() -> None:
    while _UNDO:
        _UNDO.pop()()
    _keep_nothing(False)


def _keep_nothing(on: bool) -> None:
    """save_attention's policy keeps no op while on (the tilepass+save-nothing control)."""
    from tilepass import checkpoint_policy

    original = _SAVED_OPS.setdefault("ops", checkpoint_policy.saved_attention_ops)
    checkpoint_policy.saved_attention_ops = (lambda: frozenset()) if on else original


def make_step(model, variant, args):
    cudnn = variant.endswith(CUDNN)
    variant = variant.removesuffix(CUDNN)
    if cudnn and args.device != "cuda":
        raise ValueError(f"{CUDNN!r} restricts SDPA to cuDNN's kernel, which needs CUDA (device is {args.device!r})")
    name, _, tile_tokens = variant.partition("@")
    if variant == "eager":
        fn = model
    elif variant == "compile":
        fn = torch.compile(model)
    elif variant in ("liger", "cce"):
        if args.model != "causal" and variant == "cce":
            raise ValueError("'cce' is Cut Cross-Entropy on an LM head: --model causal only")
        model = fn = with_liger_mlps(model)
        if args.model == "causal" and variant == "liger":  # + Liger's fused linear cross-entropy
            import types

            from liger_kernel.transformers.model.llama import lce_forward

            lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT: its LlamaForCausalLM
            lm.forward = types.MethodType(lce_forward, lm)
            _UNDO.append(lambda: lm.__dict__.pop("forward", None))
    elif name in TILEPASS_VARIANTS:
        opts = dict(TILEPASS_VARIANTS[name], downstream=getattr(args, "downstream", "inductor"))  # max_seq, memory_peak: inductor
        if tile_tokens:
            opts["tile_tokens"] = int(tile_tokens)
        fn = torch.compile(model, backend="tilepass", options=opts)
        if name == KEEPS_NOTHING:
            _keep_nothing(True)
    else:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}, or a tilepass one with @N "
                         f"(N tokens per tile); any of them with {CUDNN!r} last")

    def step(ids):
        with _sdpa_on_cudnn(cudnn):
            if variant == "cce":  # the hidden states, then Cut Cross-Entropy with labels shifted as transformers does
                from cut_cross_entropy import linear_cross_entropy

                hidden = fn.model(input_ids=ids).last_hidden_state
                loss = linear_cross_entropy(hidden, fn.lm_head.weight, ids, shift=1)
            elif args.model == "causal":  # as users train: the loss from labels (the output's logits dropped)
                loss = fn(input_ids=ids, labels=ids).loss
            else:
                hidden = fn(input_ids=ids).last_hidden_state
                loss = hidden.float().pow(2).mean()
            loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    return step


def _sdpa_on_cudnn(on: bool):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if on else contextlib.nullcontext()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, variant, seq, ckpt, args):
    import tilepass

    torch._dynamo.reset()
    tilepass.reset()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    step = make_step(model, variant, args)
    ids = torch.randint(0, vocab_size(args), (1, seq), device=args.device)
    gc.collect()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    row = dict(model=args.model, variant=variant, seq=seq, ckpt=ckpt, layers=args.layers, lora=args.lora,
               base_gib=base / 2**30)
    try:
        t0 = time.perf_counter()
        step(ids)
        sync(args.device)
        row["first_s"] = time.perf_counter() - t0
        if args.steps == 0:  # one step only (max_seq.py's long validations): its peak and time
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            return row
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(ids)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        row["step_s"] = statistics.median(times)
        row["tokens_per_s"] = seq / row["step_s"]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if variant.startswith("tilepass"):
            done = [r for r in tilepass.report() if r.status == "rewritten"]
            tiled = [r for r in done if r.kind in ("mlp", "moe")]
            row["loss_regions"] = sum(r.kind == "loss" for r in done)
            row["kept_logits_gib"] = sum(r.logits_bytes or 0 for r in done if r.kind == "loss") / 2**30
            row["tiled_regions"] = len(tiled)
            row["tiles"] = sorted({r.tiles for r in tiled})
            row["routed_attention"] = sum(r.kind == "attention" for r in done)
            row["saved_attention_layers"] = sum(r.kind == "checkpoint" for r in done)
            row["attention_kernels"] = sorted({r.kernel for r in done if r.kind == "attention"})
            row["head_groups"] = sorted({r.tiles or 1 for r in done if r.kind == "attention"})
            row["loss_kernel"] = sorted({r.kernel or "eager" for r in done if r.kind == "loss"})
            row["rejected"] = sorted({r.reason for r in tilepass.report() if r.status == "rejected"})
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        del step
        undo_variant()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "causal", "moe"], default="dense")
    p.add_argument("--lora", action="store_true",
                   help="PEFT LoRA r 16 on every linear layer (moe: the attention projections), base frozen")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ckpt", choices=["on", "off", "both"], default="on")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps after the first; 0: the first step alone gives peak and time")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny hidden sizes, for a CPU smoke test")
    p.add_argument("--downstream", choices=["inductor", "aot_eager", "eager"], default="inductor",
                   help="what compiles the graph after tilepass's passes (inductor, as users run it)")
    p.add_argument("--out", default=None, help="write all rows as a JSON list here")
    args = p.parse_args(argv)
    model = build_model(args)
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.ckpt]
    rows = []
    for ckpt in ckpts:
        for seq in args.seqs:
            for variant in args.variants.split(","):
                row = measure(model, variant, seq, ckpt, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # after every row: a run cut off by a time limit keeps what it measured
                    _write(args, rows)
    print(f"\n{'variant':<26}{'ckpt':<6}{'seq':>7}{'peak GiB':>10}{'step s':>9}{'first s':>9}", file=sys.stderr)
    for r in rows:
        peak = "oom" if r.get("oom") else (f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-")
        print(f"{r['variant']:<26}{str(r['ckpt']):<6}{r['seq']:>7}{peak:>10}{r.get('step_s', float('nan')):>9.3f}"
              f"{r.get('first_s', float('nan')):>9.1f}", file=sys.stderr)
    return rows


def _write(args, rows):
    import transformers

    with open(args.out, "w") as f:
        json.dump(dict(torch=torch.__version__, transformers=transformers.__version__, device=_device_name(args.device),
                       command="python " + " ".join(sys.argv), rows=rows), f, indent=1)


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
