"""tilepass under FSDP2, DDP and DeepSpeed ZeRO-3: gradients vs one device, and memory per rank.

Launched by torchrun, one process per device. ``--mode check`` (default) trains each model
under each engine for ``--steps`` SGD steps, compiled with tilepass, and compares every
step with the same model run eagerly on one device (each rank computes that reference on
its own device for every rank's batch, averaged as data parallelism averages):

* the loss of each rank's batch, and every parameter's gradient after the engine reduced
  it (DDP: ``.grad``; FSDP2: ``full_tensor()``; ZeRO-3: ``safe_get_full_grad``), to
  ``--rtol`` relative error in norm (``|g - ref| / |ref|``; 1e-5 by default, fp32);
* that each parameter's gradient is handed to the engine's reduction once per step,
  counted where the engine takes it (DDP: its comm hook's buckets; FSDP2: ``foreach_reduce``;
  ZeRO-3: ``reduce_ready_partitions_and_remove_grads``);
* that every rank runs every region with its own tile count (ranks get batches of
  different lengths: ``--layout packed``, one row of packed documents, or ``varlen``), and
  that no collective runs inside a region (a dispatch mode watches every op a region runs);
* that nobody hangs: the process group times out after ``--timeout`` seconds.

Engines: ``ddp`` (torch.compile of the DDP module); ``fsdp2-layer`` (``fully_shard`` per
decoder layer and on the root, each layer compiled); ``fsdp2-model`` (the same sharding,
the whole model compiled); ``zero3`` (DeepSpeed ZeRO stage 3, config below, every
parameter partitioned, ``engine.compile``).

``--mode memory``: one training step's peak memory per rank at ``--tokens`` tokens per rank
on a Llama-3.2-1B-shaped causal LM (4 layers, bf16, layer checkpointing, AdamW), first alone
on each rank's device (the 1-GPU run, no communication), then under FSDP2. Prints JSON.

    torchrun --nproc-per-node 2 tools/multigpu.py                                   # 2 GPUs, NCCL, inductor
    torchrun --nproc-per-node 2 tools/multigpu.py --mode memory --out mem.json       # 64K tokens per rank
    torchrun --nproc-per-node 2 tools/multigpu.py --backend gloo --device cpu        # CPU: small, aot_eager

Rank 0 prints one JSON line per (model, engine, step) and a summary; the exit status is 0
only if every check passed on every rank.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tilepass  # noqa: E402
from tilepass import runtime as tp_runtime  # noqa: E402

ENGINES = ("ddp", "fsdp2-layer", "fsdp2-model", "zero3")
MODELS = ("llama", "qwen3_moe")
LAYOUTS = ("packed", "varlen", "equal")


def zero3_config(args) -> dict:
    """DeepSpeed ZeRO-3, fp32, every parameter partitioned (no persistence threshold, so
    even the tiny test models' norms are sharded and gathered)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "reduce_bucket_size": 1 << 20,
            "contiguous_gradients": True,
            "overlap_comm": False,
            # ZeRO-3 otherwise swaps F.linear for its own autograd.Function (to save the input,
            # not the gathered weight): Dynamo then sees that Function, not a linear, and no
            # MLP is recognised. tilepass's regions keep only their input anyway.
            "memory_efficient_linear": False,
        },
        "wall_clock_breakdown": False,
    }


# --- set-up ------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["check", "memory"], default="check")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl", help="process group backend")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--downstream", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="tilepass's downstream compiler (default: inductor on cuda, aot_eager on cpu)")
    p.add_argument("--options", default="{}", help="more tilepass options as JSON, e.g. '{\"loss\": true}'")
    p.add_argument("--timeout", type=float, default=300.0, help="process group timeout, seconds")
    p.add_argument("--out", default=None, help="rank 0 writes the rows here as JSON")
    g = p.add_argument_group("check mode")
    g.add_argument("--steps", type=int, default=3)
    g.add_argument("--inject", choices=["grad2x", "collective"], default=None,
                   help="self-test of the checks, the run must then fail: grad2x backpropagates 2x the loss "
                        "(a gradient counted twice); collective all-reduces inside each region")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--rtol", type=float, default=1e-5, help="relative error in norm, loss and each gradient")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    g.add_argument("--layout", choices=LAYOUTS, default="packed",
                   help="packed: one row of documents (position ids restart), a different length per rank; "
                        "varlen: --batch rows, a different length per rank; equal: --batch x --seq everywhere")
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--seq", type=int, default=96, help="tokens per row on rank 0 (rank r: --seq - r * --seq-step)")
    g.add_argument("--seq-step", type=int, default=21)
    g.add_argument("--tile-tokens", type=int, default=16,
                   help="tilepass tile_tokens, so tile counts differ between ranks (0: tilepass's default)")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--intermediate", type=int, default=176)
    g.add_argument("--moe-intermediate", type=int, default=48)
    g.add_argument("--experts", type=int, default=4)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--vocab", type=int, default=128)
    g.add_argument("--experts-impl", choices=["grouped_mm", "batched_mm"], default="grouped_mm",
                   help="MoE: transformers' experts implementation")
    g.add_argument("--router-aux-loss", action="store_true",
                   help="MoE: add the router's aux loss (output_router_logits). Off by default: transformers "
                        "captures router logits through a ContextVar that Dynamo cannot trace when a layer is "
                        "compiled on its own (fsdp2-layer) or behind FSDP2's hooks, which breaks the graph "
                        "between router and experts, so the MoE is not tiled there")
    g.add_argument("--ddp-bucket-mb", type=float, default=25.0,
                   help="ddp: bucket size. Dynamo's DDPOptimizer splits the graph at bucket boundaries and compiles "
                        "each piece alone: a boundary inside an MLP leaves it untiled (at real sizes: 25 MB buckets, "
                        "a 1B model's MLP weights are 16-32 MB each)")
    g.add_argument("--optimize-ddp", choices=["ddp_optimizer", "off"], default="ddp_optimizer",
                   help="ddp: torch._dynamo.config.optimize_ddp. off: one graph, no split (all-reduce then waits "
                        "for the whole backward)")
    g.add_argument("--zero3-leaf", choices=["layer", "mlp", "none"], default="layer",
                   help="zero3: the modules DeepSpeed fetches as a whole (set_z3_leaf_modules): each decoder "
                        "layer, each MLP/MoE block, or none (a graph break at every module: nothing is tiled)")
    g = p.add_argument_group("memory mode (Llama-3.2-1B shapes by default)")
    g.add_argument("--tokens", type=int, default=65536, help="tokens per rank")
    g.add_argument("--mem-layers", type=int, default=4)
    g.add_argument("--mem-hidden", type=int, default=2048)
    g.add_argument("--mem-intermediate", type=int, default=8192)
    g.add_argument("--mem-heads", type=int, default=32)
    g.add_argument("--mem-kv-heads", type=int, default=8)
    g.add_argument("--mem-vocab", type=int, default=128256)
    g.add_argument("--mem-steps", type=int, default=3, help="steps; the first compiles and is not measured")
    args = p.parse_args(argv)
    args.engines = _choices(args.engines, ENGINES, "--engines")
    args.models = _choices(args.models, MODELS, "--models")
    args.downstream = args.downstream or ("inductor" if args.device == "cuda" else "aot_eager")
    args.options = json.loads(args.options)
    if not isinstance(args.options, dict):
        p.error("--options must be a JSON object")
    tilepass.Options.parse(_tilepass_options(args))  # an unknown option fails here, before any process group
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    return args


def _choices(text, valid, flag):
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(valid)}")
    return items


def _tilepass_options(args, **extra) -> dict:
    opts = dict(downstream=args.downstream)
    if args.mode == "check" and args.tile_tokens:
        opts["tile_tokens"] = args.tile_tokens
    opts.update(args.options)
    opts.update(extra)
    return opts


def init(args) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node 2 tools/multigpu.py")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        if torch.cuda.device_count() <= local:
            raise SystemExit(f"rank {rank}: no CUDA device {local} ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    kw = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout), **kw)
    return rank, world, device


def build_model(arch: str, args, device, dtype):
    from tilepass.tiny_models import tiny_model

    shape = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, vocab_size=args.vocab,
                 max_position_embeddings=max(256, args.seq * args.batch))
    if arch == "qwen3_moe":
        shape.update(num_experts=args.experts, num_experts_per_tok=args.top_k,
                     moe_intermediate_size=args.moe_intermediate, output_router_logits=args.router_aux_loss)
    extra = dict(experts_implementation=args.experts_impl) if arch == "qwen3_moe" else {}
    model = tiny_model(arch, seed=0, attn_implementation="sdpa", use_cache=False, **extra, **shape)
    return model.to(device=device, dtype=dtype)


def batch_for(rank: int, step: int, args, device) -> dict:
    """Rank ``rank``'s batch at ``step``: every rank can rebuild every rank's batch."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    length = args.seq if args.layout == "equal" else args.seq - rank * args.seq_step
    if args.layout == "packed":
        length *= args.batch  # one row holding --batch rows' worth of documents
        cuts = sorted(torch.randperm(length - 2, generator=g)[:3].add(1).tolist())
        docs = [b - a for a, b in zip([0, *cuts], [*cuts, length]) if b > a]
        ids = torch.randint(3, args.vocab, (1, length), generator=g)
        pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
        return dict(input_ids=ids.to(device), labels=ids.to(device), position_ids=pos.to(device))
    ids = torch.randint(3, args.vocab, (args.batch, length), generator=g)
    return dict(input_ids=ids.to(device), labels=ids.to(device))


# --- watching the regions and the reductions -----------------------------------------


class RegionWatch:
    """Wraps the functions tilepass's custom ops run (they look them up at call time): the
    tiled forward and backward of MLP/MoE regions, and the tiled loss where tilepass has one.
    Records each call's tokens and tiles, and flags any collective a region runs."""

    # (module, function, positions of num_tiles and tile_tokens in its arguments)
    TARGETS = {"forward": ("runtime", "run_tiled_forward", 3, 4),
               "backward": ("runtime", "run_tiled_backward", 4, 5),
               "loss": ("loss_runtime", "run_tiled_loss", 5, 6)}

    def __init__(self, inject_collective: bool = False):
        import importlib

        self.inject_collective = inject_collective
        self.calls: list[dict] = []
        self.collectives: list[str] = []
        self._orig = {}
        for phase, (module, name, *_) in self.TARGETS.items():
            try:
                mod = importlib.import_module(f"tilepass.{module}")
            except ImportError:  # a tilepass without a loss pass
                continue
            if hasattr(mod, name):
                self._orig[phase] = (mod, getattr(mod, name))
        if "forward" not in self._orig or "backward" not in self._orig:
            raise SystemExit("tilepass.runtime has no run_tiled_forward/run_tiled_backward: update RegionWatch")

    def __enter__(self):
        for phase, (mod, fn) in self._orig.items():
            setattr(mod, self.TARGETS[phase][1], self._wrap(fn, phase))
        return self

    def __exit__(self, *exc):
        for phase, (mod, fn) in self._orig.items():
            setattr(mod, self.TARGETS[phase][1], fn)

    def _wrap(self, fn, phase):
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self
        _, _, at_tiles, at_tokens = self.TARGETS[phase]

        class NoCollectives(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace in ("c10d", "_c10d_functional", "c10d_functional", "_dtensor"):
                    watch.collectives.append(f"{phase}: {func}")
                return func(*args, **(kwargs or {}))

        def wrapped(*args):
            key, x = args[0], args[1]
            tiles = len(tp_runtime.tile_sizes(x.shape[0], args[at_tiles], args[at_tokens]))
            self.calls.append(dict(phase=phase, key=key, tokens=int(x.shape[0]), tiles=tiles))
            with NoCollectives():
                if self.inject_collective:  # --inject collective: what the watch must catch
                    dist.all_reduce(torch.zeros(1, device=x.device))
                return fn(*args)

        return wrapped


class ReduceCount:
    """How many times each parameter's gradient reached the engine's reduction this step."""

    def __init__(self, names: dict[int, str]):
        self.names = names  # id(tensor the engine reports) -> parameter name
        self.counts: dict[str, int] = {}

    def add(self, tensor):
        name = self.names.get(id(tensor), f"<unknown tensor {tuple(tensor.shape)}>")
        self.counts[name] = self.counts.get(name, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _ddp_counting_hook(counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        for p in bucket.parameters():
            counter.add(p)
        return allreduce_hook(state, bucket)

    return hook


@contextlib.contextmanager
def count_fsdp2_reductions(counter):
    """FSDP2 reduce-scatters a group's gradients in one ``foreach_reduce`` call per backward."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_mod

    orig = group_mod.foreach_reduce

    def counted(fsdp_params, *a, **kw):
        for fp in fsdp_params:
            counter.add(fp.sharded_param)
        return orig(fsdp_params, *a, **kw)

    group_mod.foreach_reduce = counted
    try:
        yield
    finally:
        group_mod.foreach_reduce = orig


# --- the engines ----------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One engine around one model: call it, step it, read full gradients."""

    forward: object  # (batch) -> loss
    backward: object  # (loss) -> None
    step: object  # () -> None (optimizer step and zero grad)
    full_grads: object  # () -> {name: full gradient}, a collective for sharded engines
    counter: ReduceCount
    context: object = contextlib.nullcontext


def make_run(engine: str, model, args, device) -> Run:
    backend = tilepass.backend(**_tilepass_options(args))
    names = {id(p): n for n, p in model.named_parameters()}
    counter = ReduceCount(names)
    if engine == "zero3":
        return _zero3_run(model, args, backend, counter)

    def step():  # the optimizer is made after sharding: fully_shard replaces the parameters
        opt.step()
        opt.zero_grad(set_to_none=True)

    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=args.ddp_bucket_mb)
        ddp.register_comm_hook(None, _ddp_counting_hook(counter))
        torch._dynamo.config.optimize_ddp = "ddp_optimizer" if args.optimize_ddp == "ddp_optimizer" else False
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        compiled = torch.compile(ddp, backend=backend)
        return Run(lambda b: compiled(**b).loss, lambda loss: loss.backward(), step,
                   lambda: {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                   counter)
    from torch.distributed.fsdp import fully_shard

    layers = model.model.layers
    for layer in layers:
        if engine == "fsdp2-layer":
            layer.compile(backend=backend)
        fully_shard(layer)
    fully_shard(model)
    # fully_shard keeps the parameter objects' names but replaces them by DTensors
    counter.names = {id(p): n for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    call = torch.compile(model, backend=backend) if engine == "fsdp2-model" else model
    return Run(lambda b: call(**b).loss, lambda loss: loss.backward(), step,
               lambda: {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None},
               counter, lambda: count_fsdp2_reductions(counter))


def _zero3_run(model, args, backend, counter) -> Run:
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_grad
    except ImportError as e:
        raise SystemExit(f"--engines zero3 needs DeepSpeed (pip install deepspeed): {e}") from None
    if args.zero3_leaf != "none":
        # ZeRO-3 fetches parameters in a pre-forward hook on every module, each one a
        # torch.compiler.disable'd graph break: no MLP is whole in one graph then. A leaf
        # module is fetched at once (its own hooks only), like an FSDP2 unit.
        from deepspeed.utils import set_z3_leaf_modules

        leaf = type(model.model.layers[0]) if args.zero3_leaf == "layer" else type(model.model.layers[0].mlp)
        set_z3_leaf_modules(model, [leaf])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=zero3_config(args),
                                      dist_init_required=False)
    zopt = engine.optimizer
    orig = zopt.reduce_ready_partitions_and_remove_grads

    def counted(param):
        counter.add(param)
        return orig(param)

    zopt.reduce_ready_partitions_and_remove_grads = counted  # the grad hooks look it up on the instance
    engine.compile(backend=backend)
    # ZeRO-3 gathers a full gradient per parameter; every rank must call it (a collective)
    grads = lambda: {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}  # noqa: E731
    return Run(lambda b: engine(**b).loss, engine.backward, lambda: engine.step(), grads, counter)


# --- check mode -----------------------------------------------------------------------


def reference(model, args, world, device) -> list[dict]:
    """The same model on one device, eager: per step, each rank's loss and the gradients
    averaged over the ranks' batches (what DDP/FSDP2/ZeRO-3 average)."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    steps = []
    for step in range(args.steps):
        losses = []
        for r in range(world):
            loss = model(**batch_for(r, step, args, device)).loss
            (loss / world).backward()
            losses.append(loss.detach())
        steps.append(dict(losses=losses, grads={n: p.grad.detach().clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_one(arch: str, engine: str, args, rank, world, device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    tilepass.reset()
    ref = reference(build_model(arch, args, device, dtype), args, world, device)
    model = build_model(arch, args, device, dtype)
    run = make_run(engine, model, args, device)
    rows = []
    with RegionWatch(args.inject == "collective") as watch, run.context():
        for step in range(args.steps):
            start = time.perf_counter()
            watch.calls.clear()
            watch.collectives.clear()
            loss = run.forward(batch_for(rank, step, args, device))
            run.backward(loss * 2 if args.inject == "grad2x" else loss)
            grads = run.full_grads()  # after the engine reduced them; a collective for FSDP2/ZeRO-3
            counts = run.counter.take()
            run.step()
            want = ref[step]
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            verdict = step_problems(loss, want["losses"][rank], grads, want["grads"], counts, trainable, args.rtol)
            tiles = _tile_summary(watch.calls, _local_tokens(rank, step, args), args.tile_tokens)
            problems = verdict.pop("problems") + tiles.pop("problems")
            if watch.collectives:
                problems.append(f"collectives inside a region: {watch.collectives[:3]}")
            rows.append(dict(model=arch, engine=engine, step=step, rank=rank, loss=loss.item(),
                             ref_loss=want["losses"][rank].item(), **verdict, **tiles,
                             records=_record_kinds(), seconds=round(time.perf_counter() - start, 3),
                             ok=not problems, problems=problems))
    return rows


def step_problems(loss, ref_loss, grads: dict, ref_grads: dict, counts: dict, trainable: list, rtol: float) -> dict:
    """One rank's step against the reference: the loss, every gradient (relative error in
    norm), and how often each trainable parameter reached the engine's reduction (once)."""
    problems = []
    loss_err = rel_err(loss.reshape(()), ref_loss.reshape(()))
    if not loss_err <= rtol:
        problems.append(f"loss {loss.item():.8g} vs {ref_loss.item():.8g} (rel {loss_err:.2e})")
    errors = {n: rel_err(grads[n], g) for n, g in ref_grads.items() if n in grads}
    worst = max(errors, key=errors.get) if errors else None
    bad = [n for n, e in errors.items() if not e <= rtol]
    if bad:
        problems.append(f"{len(bad)} gradients off, worst {worst} rel {errors[worst]:.2e}")
    missing = sorted(set(ref_grads) - set(grads))
    if missing:
        problems.append(f"no gradient for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    not_once = {n: counts.get(n, 0) for n in trainable if counts.get(n, 0) != 1}
    unknown = sorted(set(counts) - set(trainable))
    if not_once or unknown:
        problems.append(f"not reduced once per step: {dict(list(not_once.items())[:4])}"
                        f"{f' and unknown tensors {unknown[:3]}' if unknown else ''}")
    return dict(loss_rel=loss_err, worst_grad=worst, worst_grad_rel=errors.get(worst), grads=len(errors),
                reductions=sum(counts.values()), problems=problems)


def _local_tokens(rank, step, args) -> int:
    return batch_for(rank, step, args, torch.device("cpu"))["input_ids"].numel()


def _tile_summary(calls: list[dict], tokens: int, tile_tokens: int) -> dict:
    """The regions this rank ran in one step. Each MLP/MoE region must see this rank's own
    token count and (with ``tile_tokens``) split it into its own number of tiles, and run
    one backward per forward."""
    kinds = {r.region_key: r.kind for r in tilepass.report() if r.region_key}
    fwd = [c for c in calls if c["phase"] == "forward"]
    bwd = [c for c in calls if c["phase"] == "backward"]
    problems = []
    if not fwd:
        problems.append("no tiled region ran")
    if len(bwd) != len(fwd):
        problems.append(f"{len(fwd)} tiled forwards but {len(bwd)} tiled backwards")
    for c in calls:
        if kinds.get(c["key"]) not in ("mlp", "moe"):
            continue
        want_tiles = -(-tokens // tile_tokens) if tile_tokens else c["tiles"]
        if c["tokens"] != tokens or c["tiles"] != want_tiles:
            problems.append(f"{kinds[c['key']]} {c['phase']}: {c['tokens']} tokens in {c['tiles']} tiles, "
                            f"this rank has {tokens} tokens ({want_tiles} tiles)")
            break
    loss = [c for c in calls if c["phase"] == "loss"]
    return dict(region_calls=len(fwd), region_tokens=sorted({c["tokens"] for c in fwd}),
                region_tiles=sorted({c["tiles"] for c in fwd}), loss_calls=len(loss),
                loss_tokens=sorted({c["tokens"] for c in loss}), loss_tiles=sorted({c["tiles"] for c in loss}),
                problems=problems)


def _record_kinds() -> dict:
    kinds: dict[str, int] = {}
    for r in tilepass.report():
        if r.status == "rewritten":
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return kinds


def check_mode(args, rank, world, device) -> list[dict]:
    rows = []
    for arch in args.models:
        for engine in args.engines:
            try:
                got = check_one(arch, engine, args, rank, world, device)
            except Exception as e:  # a failure on one rank: report it, then the verdict fails everywhere
                import traceback

                traceback.print_exc()
                got = [dict(model=arch, engine=engine, step=None, rank=rank, ok=False,
                            problems=[f"{type(e).__name__}: {str(e)[:500]}"])]
                _emit(rank, world, got)
                raise  # a half-finished collective leaves the group unusable: stop here
            _emit(rank, world, got)
            rows += got
            dist.barrier()
    return rows


# --- memory mode ----------------------------------------------------------------------


def memory_model(args, device):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.mem_hidden, intermediate_size=args.mem_intermediate, num_hidden_layers=args.mem_layers,
        num_attention_heads=args.mem_heads, num_key_value_heads=args.mem_kv_heads, vocab_size=args.mem_vocab,
        max_position_embeddings=args.tokens, attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def memory_one(sharded: bool, args, rank, device) -> dict:
    from torch.distributed.fsdp import fully_shard

    tilepass.reset()
    model = memory_model(args, device)
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    call = torch.compile(model, backend=tilepass.backend(**_tilepass_options(args)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, args.mem_vocab, (1, args.tokens), generator=g).to(device)
    cuda = device.type == "cuda"
    times, peaks = [], []
    for step in range(args.mem_steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        call(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step compiles
            times.append(time.perf_counter() - start)
            if cuda:
                peaks.append(dict(peak=torch.cuda.max_memory_allocated(), before=before))
    row = dict(run="fsdp2" if sharded else "1-gpu", rank=rank, tokens=args.tokens, layers=args.mem_layers,
               step_s=sorted(times)[len(times) // 2] if times else None, records=_record_kinds())
    if peaks:
        last = peaks[-1]
        row.update(peak_gib=round(last["peak"] / 2**30, 3), before_step_gib=round(last["before"] / 2**30, 3),
                   step_peak_above_gib=round((last["peak"] - last["before"]) / 2**30, 3),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
    else:
        row["note"] = "peak memory is measured on CUDA only"
    del call, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return row


def memory_mode(args, rank, world, device) -> list[dict]:
    rows = []
    for sharded in (False, True):  # the 1-GPU run touches no collective: every rank runs it alone
        row = memory_one(sharded, args, rank, device)
        row.update(world=world if sharded else 1, ok=True, problems=[])
        _emit(rank, world, [row])
        rows.append(row)
        dist.barrier()
    return rows


# --- output ---------------------------------------------------------------------------


def _emit(rank, world, rows):
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        for rank_rows in everyone:
            for row in rank_rows:
                print(json.dumps(row), flush=True)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init(args)
    if args.mode == "check":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference is compared to 1e-5
        torch.backends.cudnn.allow_tf32 = False
    rows = (check_mode if args.mode == "check" else memory_mode)(args, rank, world, device)
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    all_rows = [r for rank_rows in everyone for r in rank_rows]
    failed = [r for r in all_rows if not r["ok"]]
    if rank == 0:
        header = dict(torch=torch.__version__, world=world, backend=args.backend, device=args.device,
                      downstream=args.downstream, command="torchrun " + " ".join(sys.argv))
        if args.device == "cuda":
            header["gpu"] = torch.cuda.get_device_name()
        summary = dict(summary=True, rows=len(all_rows), failed=len(failed), **header)
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(header, rows=all_rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
