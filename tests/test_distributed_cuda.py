"""SparseAdamW on sharded DTensors with CUDA tensors (skipped without a GPU).

A one-GPU machine cannot run FSDP2 over several ranks (NCCL needs a GPU per rank; gloo reduces CUDA
tensors in all_reduce and broadcast only, not FSDP2's reduce-scatter), so:

- world size 1: real FSDP2 (``fully_shard``) on CUDA over NCCL;
- world sizes 2 and 3: every rank shares the GPU, holds its Shard(0) pieces of each parameter as
  DTensors on a CUDA mesh (gloo; SparseAdamW's one collective is an all_reduce, which gloo does on
  CUDA tensors) and gets its slice of the grads of the full model; the shards are gathered back
  through the CPU after every step. Blocks split across ranks then run through the compiled
  Triton and the CUDA kernels.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _distributed import batches, full_params, loss_of, model, optimizer

from sparse_grad import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BASE = {"lr": 1e-2, "density": 0.3, "block_size": 16}
CONFIGS = [{}, {"state_layout": "compact", "error_feedback": True, "max_grad_norm": 0.05, "score_ema": 0.8,
                "reselect_every": 2},
           {"scope": "tensor", "min_blocks_per_tensor": 2, "score": "rms", "state_layout": "compact"}]
STEPS = 6


def _backends() -> list[str]:
    return [b for b in ("triton", "cuda", "reference") if backends.unavailable_reason(b, torch.device("cuda")) is None]


def _worker(rank, world, folder, pg_backend, fn, args):
    torch.cuda.set_device(0)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group(pg_backend, store=store, rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(folder, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip exit-time destructors (see tests/_distributed.py)


def _spawn(fn, world, folder, pg_backend, *args):
    mp.spawn(_worker, args=(world, str(folder), pg_backend, fn, args), nprocs=world, join=True)
    return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False) for r in range(world)]


def _one_process(options):
    net = model().cuda()
    opt = optimizer(net, options)
    for x, y in batches(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(net, x.cuda(), y.cuda()).backward()
        opt.step()
    return {n: p.detach().cpu() for n, p in net.named_parameters()}


def _rows(p, rank, world):
    chunk = -(-p.shape[0] // world)
    first = min(rank * chunk, p.shape[0])
    return first, max(0, min(chunk, p.shape[0] - first)), chunk


def _shard(t, mesh, rank, world):
    from torch.distributed.tensor import DTensor, Shard
    first, count, _ = _rows(t, rank, world)
    return DTensor.from_local(t.detach()[first:first + count].clone(), mesh, [Shard(0)], run_check=False,
                              shape=t.shape, stride=t.stride())


def _gather(shard, full, rank, world):
    """The full tensor from every rank's shard, through the CPU (gloo gathers no CUDA tensors)."""
    _, count, chunk = _rows(full, rank, world)
    row = full[0].numel()
    local = torch.zeros(chunk * row, dtype=full.dtype)
    local[:count * row] = shard.to_local().reshape(-1).cpu()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    full.copy_(torch.cat(parts)[:full.numel()].view_as(full))


def _sharded_runs(rank, world, configs):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cuda", (world,))
    out = []
    for options in configs:
        net = model().cuda()
        names = [n for n, _ in net.named_parameters()]
        shards = [torch.nn.Parameter(_shard(p, mesh, rank, world)) for p in net.parameters()]
        opt = optimizer_of(shards, names, options)
        for x, y in batches(STEPS):
            net.zero_grad(set_to_none=True)
            loss_of(net, x.cuda(), y.cuda()).backward()
            for s, p in zip(shards, net.parameters()):
                s.grad = _shard(p.grad, mesh, rank, world)
            opt.step()
            with torch.no_grad():
                for s, p in zip(shards, net.parameters()):
                    _gather(s, p, rank, world)
        out.append({n: p.detach().cpu() for n, p in net.named_parameters()})
    return out


def optimizer_of(shards, names, options):
    from sparse_grad import SparseAdamW
    return SparseAdamW(list(zip(names, shards)), **options)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_cuda_equals_one_process(world, tmp_path):
    configs = [{**BASE, **c, "backend": b} for b in _backends() for c in CONFIGS]
    results = _spawn(_sharded_runs, world, tmp_path, "gloo", configs)
    for i, options in enumerate(configs):
        expected = _one_process(options)
        for rank in range(world):
            for name, value in expected.items():
                torch.testing.assert_close(results[rank][i][name], value, atol=1e-6, rtol=1e-5,
                                           msg=lambda m, o=options, n=name: f"{o}, {n}: {m}")


def _fsdp_runs(rank, world, configs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cuda", (world,))
    out = []
    for options in configs:
        net = model().cuda()
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = optimizer(net, options)
        for x, y in batches(STEPS):
            opt.zero_grad(set_to_none=True)
            loss_of(net, x.cuda(), y.cuda()).backward()
            opt.step()
        out.append({n: p.cpu() for n, p in full_params(net).items()})
    return out


def test_fsdp2_nccl_one_rank_equals_one_process(tmp_path):
    configs = [{**BASE, **c, "backend": b} for b in _backends() for c in CONFIGS]
    results = _spawn(_fsdp_runs, 1, tmp_path, "nccl", configs)
    for i, options in enumerate(configs):
        expected = _one_process(options)
        for name, value in expected.items():
            torch.testing.assert_close(results[0][i][name], value, atol=1e-6, rtol=1e-5,
                                       msg=lambda m, o=options, n=name: f"{o}, {n}: {m}")
