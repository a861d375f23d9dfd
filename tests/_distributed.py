"""Multi-process helpers for tests/test_distributed_*.py: gloo process groups on CPU, spawned with
torch.multiprocessing; workers return results through files in the test's tmp_path."""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_grad import SparseAdamW

BATCH = 6  # divisible by every world size tested (1, 2, 3)


def _worker(rank: int, world: int, folder: str, fn, args) -> None:
    torch.set_num_threads(1)  # a 2-core CI machine runs 3 workers
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    except BaseException:
        with open(os.path.join(folder, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # The result is on disk. Leave without Python's and C++'s exit-time destructors: gloo's (and
    # DDP's) background threads can abort a process there ("terminate called without an active
    # exception", seen a few times in this work on a loaded 2-core machine), failing a passed test.
    os._exit(0)


def spawn(fn, world: int, folder, *args) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; their return values, by rank."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name == "store" or name.startswith("result"):
            os.remove(os.path.join(folder, name))
    mp.spawn(_worker, args=(world, folder, fn, args), nprocs=world, join=True)
    return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False) for r in range(world)]


def model() -> torch.nn.Module:
    """Odd sizes (481, 37, 185, 5, 5, 5 elements): Shard(0) over 2 or 3 ranks splits blocks of 16."""
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5),
                               torch.nn.LayerNorm(5))


def batches(steps: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = torch.exp(torch.randn(BATCH, 13, generator=g))  # heavy-tailed inputs
        out.append((torch.randn(BATCH, 13, generator=g) * scale, torch.randn(BATCH, 5, generator=g)))
    return out


def loss_of(net, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(net(x), y)


def train(net, opt, data, rank: int = 0, world: int = 1) -> None:
    """Steps on each rank's equal slice of the global batch (mean losses: averaged grads are the
    global batch's)."""
    per = BATCH // world
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_of(net, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        opt.step()


def blueprint():
    """A fixed random blueprint for :func:`model` at block size 16."""
    from sparse_grad.blueprint import Blueprint
    g = torch.Generator().manual_seed(99)
    net = model()
    return Blueprint({n: torch.rand(-(-p.numel() // 16), generator=g) for n, p in net.named_parameters()},
                     block_size=16, shapes={n: p.shape for n, p in net.named_parameters()},
                     dtypes={n: str(p.dtype) for n, p in net.named_parameters()})


def optimizer(net, options: dict) -> SparseAdamW:
    """SparseAdamW over ``net``'s named params; ``options["blueprint"] == "test"`` stands for
    :func:`blueprint` (options must be picklable to reach the workers)."""
    options = dict(options)
    if options.get("blueprint") == "test":
        options["blueprint"] = blueprint()
    return SparseAdamW(net.named_parameters(), **options)


def freeze(net, names=()) -> None:
    """Params that get no grad (they take no part in the selection)."""
    for name, p in net.named_parameters():
        p.requires_grad_(name not in names)


def single_process(options: dict, steps: int, dtype=torch.float32, frozen=()) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole batch."""
    net = model().to(dtype)
    freeze(net, frozen)
    opt = optimizer(net, options)
    train(net, opt, [(x.to(dtype), y.to(dtype)) for x, y in batches(steps)])
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def fsdp(net, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full_params(net) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in net.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def fsdp_runs(rank: int, world: int, configs: list[dict], steps: int) -> list[dict[str, torch.Tensor]]:
    """Train one FSDP2 model per config (``{"options": ..., "dtype": ...}``); their full params."""
    out = []
    for config in configs:
        dtype = config.get("dtype", torch.float32)
        net = model().to(dtype)
        freeze(net, config.get("frozen", ()))
        net = fsdp(net, world)
        opt = optimizer(net, config["options"])
        train(net, opt, [(x.to(dtype), y.to(dtype)) for x, y in batches(steps)], rank, world)
        out.append(full_params(net))
    return out


def checkpoint_state(net, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from sparse_grad.distributed import optimizer_state_dict
    return {"model": get_model_state_dict(net), "optim": optimizer_state_dict(opt)}


def save_then_continue(rank: int, world: int, configs: list[dict], before: int, after: int, folder: str):
    """Per config: train ``before`` steps, save a DCP checkpoint, train ``after`` more steps."""
    import torch.distributed.checkpoint as dcp
    out = []
    for n, options in enumerate(configs):
        net = fsdp(model(), world)
        opt = optimizer(net, options)
        data = batches(before + after)
        train(net, opt, data[:before], rank, world)
        dcp.save(checkpoint_state(net, opt), checkpoint_id=os.path.join(folder, f"checkpoint{n}"))
        train(net, opt, data[before:], rank, world)
        out.append(full_params(net))
    return out


def resume(rank: int, world: int, configs: list[dict], before: int, after: int, folder: str):
    """Per config: load the checkpoint of :func:`save_then_continue` at this world size and train
    ``after`` steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from sparse_grad.distributed import load_optimizer_state_dict
    out = []
    for n, options in enumerate(configs):
        net = fsdp(model(), world)
        opt = optimizer(net, options)
        state = checkpoint_state(net, opt)
        dcp.load(state, checkpoint_id=os.path.join(folder, f"checkpoint{n}"))
        set_model_state_dict(net, state["model"])
        load_optimizer_state_dict(opt, state["optim"])
        train(net, opt, batches(before + after)[before:], rank, world)
        out.append(full_params(net))
    return out


def ddp_runs(rank: int, world: int, configs: list[dict], steps: int) -> list[dict[str, torch.Tensor]]:
    """Train one DDP model per options dict; their params."""
    from torch.nn.parallel import DistributedDataParallel
    out = []
    for options in configs:
        net = model()
        opt = optimizer(net, options)
        train(DistributedDataParallel(net), opt, batches(steps), rank, world)
        out.append({name: p.detach().clone() for name, p in net.named_parameters()})
    return out


def per_rank_state_dict(rank: int, world: int, options: dict, before: int, after: int):
    """SparseAdamW.state_dict() / load_state_dict() on each rank at an unchanged world size:
    (the uninterrupted run's params, the resumed run's params, the compact capacity and the
    number of selected blocks), or the ValueError's message where loading refuses."""
    import copy

    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )
    data = batches(before + after)
    net = fsdp(model(), world)
    opt = optimizer(net, options)
    train(net, opt, data[:before], rank, world)
    saved_model = copy.deepcopy(get_model_state_dict(net))
    saved_opt = copy.deepcopy(opt.state_dict())
    capacity = int(opt.group_state(0).compact["block_of_slot"].numel()) if opt.group_state(0).compact is not None else None
    selected = int(opt.group_state(0).selection.block_ids.numel())
    train(net, opt, data[before:], rank, world)
    again = fsdp(model(), world)
    set_model_state_dict(again, saved_model)
    resumed = optimizer(again, options)
    try:
        resumed.load_state_dict(saved_opt)
    except ValueError as err:
        return str(err), capacity, selected
    train(again, resumed, data[before:], rank, world)
    return (full_params(net), full_params(again)), capacity, selected
