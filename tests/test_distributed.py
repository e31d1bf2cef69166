"""DDP over two CPU processes (gloo): tilepass's weight gradients reach DDP once per
parameter (no "Expected to mark a variable ready only once"), and the averaged gradients
equal eager DDP's."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, h=32, i=96):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.g1, self.u1, self.d1 = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        self.g2, self.u2, self.d2 = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        n = self.norm1(x)
        x = x + self.d1(F.silu(self.g1(n)) * self.u1(n))
        n = self.norm2(x)
        return x + self.d2(F.silu(self.g2(n)) * self.u2(n))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_path):
    """Eager DDP, then tilepass under DDP, in the same two processes (one spawn, one group):
    rank 0 saves each run's averaged gradients to ``out_path``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for use_tilepass in (False, True):
        torch.manual_seed(0)
        model = Net().double()
        ddp = nn.parallel.DistributedDataParallel(model)
        if use_tilepass:
            import tilepass

            ddp = torch.compile(ddp, backend="tilepass", options={"downstream": "aot_eager", "num_tiles": 3})
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(2):  # two steps: DDP's ready bookkeeping is reset between them
            x = torch.randn(2, 29, 32, generator=g, dtype=torch.float64)
            model.zero_grad(set_to_none=True)
            (ddp(x) * torch.randn(2, 29, 32, generator=g, dtype=torch.float64)).sum().backward()
        results[use_tilepass] = {n: p.grad for n, p in model.named_parameters()}
        dist.barrier()
    if rank == 0:
        import tilepass

        results["count"] = len([r for r in tilepass.report() if r.status == "rewritten"])
        torch.save(results, out_path)
    dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts otherwise)
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can still be joinable
    # then, and std::terminate aborts the process ("terminate called without an active
    # exception", seen once in CI). The results are already on disk.
    os._exit(0)


@pytest.mark.parametrize("world", [2])
def test_ddp_gradients_match_eager_ddp(tmp_path, world):
    path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(world, _free_port(), path), nprocs=world, join=True)
    results = torch.load(path)
    assert results["count"] == 2  # both MLPs (one DDP bucket)
    for name, want in results[False].items():
        torch.testing.assert_close(results[True][name], want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def _fsdp_worker(rank, world, port, out_path):
    """Eager FSDP2, then tilepass under FSDP2, in the same two processes (as _worker)."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for use_tilepass in (False, True):
        torch.manual_seed(0)
        model = Net().double()
        fully_shard(model)
        fn = model
        if use_tilepass:
            import tilepass

            fn = torch.compile(model, backend="tilepass", options={"downstream": "aot_eager", "num_tiles": 3})
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            x = torch.randn(2, 29, 32, generator=g, dtype=torch.float64)
            model.zero_grad(set_to_none=True)
            (fn(x) * torch.randn(2, 29, 32, generator=g, dtype=torch.float64)).sum().backward()
        results[use_tilepass] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        dist.barrier()
    if rank == 0:
        import tilepass

        results["count"] = len([r for r in tilepass.report() if r.status == "rewritten"])
        torch.save(results, out_path)
    dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts otherwise)
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can still be joinable
    # then, and std::terminate aborts the process ("terminate called without an active
    # exception", seen once in CI). The results are already on disk.
    os._exit(0)


def test_fsdp2_gradients_match_eager_fsdp2(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    path = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    results = torch.load(path)
    assert results["count"] == 2
    for name, want in results[False].items():
        torch.testing.assert_close(results[True][name], want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
