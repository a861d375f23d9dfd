"""Small models and gradient helpers for the tests of the features above the optimizer."""
from __future__ import annotations

import contextlib

import torch
from _utils import heavy_tailed

from sparse_grad.demo import TinyLM


def odd_model(device="cpu") -> torch.nn.Module:
    """Parameters of odd sizes (481, 37, 185, 5, 5, 5 elements), named like a real model's."""
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5),
                               torch.nn.LayerNorm(5)).to(device)


def tiny_lm() -> TinyLM:
    return TinyLM(16, width=32, layers=1, heads=2)


def set_grads(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """Give every parameter but those named in ``skip`` a fresh heavy-tailed grad."""
    grads = []
    for name, p in model.named_parameters():
        p.grad = None if name in skip else heavy_tailed(p.shape, p.dtype, p.device)
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def step_counts(opt, params) -> list[torch.Tensor]:
    return [opt.state[p]["block_step"].clone() if p in opt.state else None for p in params]


def updated_blocks(opt, params, counts_before) -> set[int]:
    """Global ids (over ``params``) of the blocks whose step count rose since ``counts_before``."""
    ids, offset = set(), 0
    for p, before in zip(params, counts_before):
        after = opt.state[p]["block_step"].cpu()
        rose = after - (0 if before is None else before.cpu())
        ids |= {offset + int(i) for i in torch.nonzero(rose).flatten()}
        offset += after.numel()
    return ids


@contextlib.contextmanager
def no_host_sync():
    """Fail on any CUDA host synchronization inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def one_thread():
    """Train tiny models on one CPU thread: they run as fast as on two, and do not slow down
    several-fold when another process keeps a core of a 2-core machine busy (a second torch
    thread then waits on it at every small op; measured 1.8 s instead of 0.65 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
