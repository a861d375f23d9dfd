"""Fine-tune a small byte-level transformer with SparseAdamW under FSDP2 (fully_shard), on CPUs
(gloo) or GPUs (nccl), and checkpoint it with torch.distributed.checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_finetune.py                       # CPU, gloo
    torchrun --nproc_per_node=8 examples/fsdp2_finetune.py --steps 1000          # 8 GPUs, nccl
    torchrun --nproc_per_node=2 examples/fsdp2_finetune.py --save ckpt           # then resume
    torchrun --nproc_per_node=3 examples/fsdp2_finetune.py --resume ckpt         # at another world size

The model starts from fixed random weights and adapts to English prose that ships with Python
(``pydoc_data.topics``); each rank trains on its slice of every global batch, so the run is the
same one-process run on the whole batch, whatever the number of ranks (up to fp32 rounding).
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sparse_grad import SparseAdamW
from sparse_grad.demo import TinyLM, batches, lm_loss, prose_bytes
from sparse_grad.distributed import load_optimizer_state_dict, optimizer_state_dict


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=24, help="global batch (divisible by the world size)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=256,
                        help="elements per block (the library default, 4096, is sized for large models)")
    parser.add_argument("--state-layout", choices=("dense", "compact"), default="dense")
    parser.add_argument("--reselect-every", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=400_000, help="how much prose to train on")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save", help="write a DCP checkpoint to this folder at the end")
    parser.add_argument("--resume", help="continue from a DCP checkpoint written by --save")
    return parser.parse_args(argv)


def checkpoint_state(model, opt, step: int) -> dict:
    return {"model": get_model_state_dict(model), "optim": optimizer_state_dict(opt),
            "step": torch.tensor(step)}


def main(argv=None) -> dict:
    args = parse(argv)
    # TinyLM returns a view of its logits; lm_loss modifies nothing in place, so FSDP2's warning
    # about in-place ops on a module's output view does not apply here.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    if not dist.is_initialized():  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the world size {world}")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    model = TinyLM(args.context, width=args.width, layers=args.layers).to(device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SparseAdamW(model.named_parameters(), lr=args.lr, density=args.density, block_size=args.block_size,
                      max_grad_norm=1.0, state_layout=args.state_layout, reselect_every=args.reselect_every)

    start = 0
    if args.resume:
        state = checkpoint_state(model, opt, 0)  # the template dcp.load fills in, resharded
        dcp.load(state, checkpoint_id=args.resume)
        set_model_state_dict(model, state["model"])
        load_optimizer_state_dict(opt, state["optim"])
        start = int(state["step"])

    data = prose_bytes(args.bytes)
    per = args.batch // world
    losses = []
    stream = batches(data, start + args.steps, args.batch, args.context, seed=1)
    for step, (x, y) in enumerate(stream):
        if step < start:  # the batches the checkpointed run already took
            continue
        x, y = x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.SUM)
        losses.append(global_loss.item() / world)
        if rank == 0 and (step + 1 - start) % args.log_every == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}", flush=True)

    if args.save:
        dcp.save(checkpoint_state(model, opt, start + args.steps), checkpoint_id=args.save)
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"done: world size {world}, {params:,} params, density {args.density}, "
              f"steps {start + 1}-{start + args.steps}, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}"
              + (f", saved to {args.save}" if args.save else ""), flush=True)
    return {"losses": losses, "params": params, "world": world}


if __name__ == "__main__":
    main()
    dist.barrier()  # gloo aborts a process whose peers tear down while it still talks to them
    dist.destroy_process_group()
