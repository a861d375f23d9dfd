"""Optimizer step time and SparseAdamW's extra communication under FSDP2, per rank.

    torchrun --nproc_per_node=2 benchmarks/fsdp2_step.py            # CPU, gloo
    torchrun --nproc_per_node=8 benchmarks/fsdp2_step.py --width 1024 --layers 12   # GPUs, nccl

For torch.optim.AdamW (foreach, on the DTensors) and SparseAdamW at several densities: the median
and mean time of ``opt.step()`` over all but the first 3 steps (after a barrier, so every rank starts together), the bytes SparseAdamW
all-reduces per step (its score vector, counted at the call) and the bytes of FSDP2's gradient
reduce-scatter (the grads' full size) for comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sparse_grad import SparseAdamW
from sparse_grad.optim import sharding as _sharding
from sparse_grad.demo import TinyLM, batches, lm_loss, stdlib_bytes


def run(make_opt, args, device, mesh, rank, world):
    torch.manual_seed(0)
    model = TinyLM(args.context, width=args.width, layers=args.layers).to(device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model.parameters())
    reduced = []
    real = dist.all_reduce

    def counting(tensor, *a, **k):
        reduced.append(tensor.numel() * tensor.element_size())
        return real(tensor, *a, **k)

    _sharding.dist.all_reduce = counting
    times = []
    per = args.batch // world
    try:
        for x, y in batches(stdlib_bytes(300_000), args.steps, args.batch, args.context, seed=1):
            loss = lm_loss(model, x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        _sharding.dist.all_reduce = real
    params = sum(p.numel() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1e3 * statistics.median(times[3:]), 1e3 * statistics.mean(times[3:]), sum(reduced) / args.steps, grad_bytes, params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.1, 0.02])
    args = parser.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    runs = [("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))]
    runs += [(f"SparseAdamW d={d:g}", lambda ps, d=d: SparseAdamW(ps, lr=1e-3, density=d, block_size=args.block_size))
             for d in args.densities]
    runs += [(f"SparseAdamW d={args.densities[-1]:g} reselect_every=10",
              lambda ps: SparseAdamW(ps, lr=1e-3, density=args.densities[-1], block_size=args.block_size,
                                     reselect_every=10))]
    rows = [(name, *run(make, args, device, mesh, rank, world)) for name, make in runs]
    if rank == 0:
        params, grad_bytes = rows[0][5], rows[0][4]
        print(f"{world} ranks on {device.type}, {params:,} params, block {args.block_size}, torch {torch.__version__}, "
              f"torch threads {torch.get_num_threads()}; FSDP2 reduce-scatters {grad_bytes:,} bytes of grads per step")
        print("| optimizer | step ms, median (rank 0) | step ms, mean | bytes all-reduced by SparseAdamW per step |")
        print("|---|---|---|---|")
        for name, median, mean, reduced, _, _ in rows:
            print(f"| {name} | {median:.2f} | {mean:.2f} | {reduced:,.0f} |")
    dist.barrier()  # gloo aborts a process whose peers tear down while it still talks to them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
