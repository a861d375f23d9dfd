"""SparseAdamW under FSDP2 (fully_shard, DTensor Shard(0)) on gloo/CPU: the same result as one
process on the same global batch, for every selection feature, at world sizes 1, 2 and 3."""
from __future__ import annotations

import _distributed
import pytest
import torch
from _distributed import fsdp, model, single_process, spawn
from _utils import TOLERANCES

from sparse_grad import backends

BASE = {"lr": 1e-2, "density": 0.3, "block_size": 16}
CONFIGS = [
    {},
    {"state_layout": "compact", "weight_decay": 0.1},
    {"scope": "tensor", "min_blocks_per_tensor": 2, "score": "rms"},
    {"min_blocks_per_tensor": 3, "score_ema": 0.8, "max_grad_norm": 0.05, "reselect_every": 2},
    {"error_feedback": True, "state_layout": "compact", "reselect_every": 3, "maximize": True},
    {"selection": "random", "seed": 3, "state_layout": "compact"},
    {"blueprint": "test", "blueprint_weight": 0.5},
    {"density": 1.0, "max_grad_norm": 0.1},
    {"backend": "reference", "error_feedback": True, "max_grad_norm": 0.2},
]
if backends.unavailable_reason("triton", torch.device("cpu")) is None:  # TRITON_INTERPRET=1
    CONFIGS.append({"backend": "triton", "state_layout": "compact", "score_ema": 0.5})
STEPS = 6


def _tolerance(options: dict, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for sharded vs one process. Block scores are fp32 sums whatever the dtype
    (design §2), and a block split between ranks is summed in another order (partial sums, then
    an all_reduce). Clipping scales every grad by a coefficient from those sums, so in fp64 the
    coefficient differs by a few fp32 ulps, and each step moves a param by at most ~lr: after
    STEPS steps, params differ by up to STEPS · lr · (a few fp32 ulps). Elsewhere the fp32
    scores only rank blocks, and the arithmetic is the dtype's own."""
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float64 and options.get("max_grad_norm") is not None:
        atol = max(atol, STEPS * options["lr"] * 8 * torch.finfo(torch.float32).eps)
    return atol, rtol


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_equals_one_process(world, tmp_path):
    configs = [{"options": {**BASE, **c}} for c in CONFIGS]
    configs.append({"options": {**BASE, "max_grad_norm": 0.1}, "dtype": torch.float64})
    for layout in ("dense", "compact"):  # params without a grad take no part
        configs.append({"options": {**BASE, "state_layout": layout, "reselect_every": 2}, "frozen": ("0.bias", "3.weight")})
    results = spawn(_distributed.fsdp_runs, world, tmp_path, configs, STEPS)
    start = {n: p.detach() for n, p in model().named_parameters()}
    for i, config in enumerate(configs):
        dtype = config.get("dtype", torch.float32)
        expected = single_process(config["options"], STEPS, dtype, config.get("frozen", ()))
        atol, rtol = _tolerance(config["options"], dtype)
        for rank, per_rank in enumerate(results):
            for name, value in expected.items():
                torch.testing.assert_close(per_rank[i][name], value, atol=atol, rtol=rtol,
                                           msg=lambda m, c=config, r=rank, n=name: f"config {c}, rank {r}, {n}: {m}")
        moved = sum(not torch.equal(expected[n], start[n].to(dtype)) for n in expected)
        assert moved >= 3, f"config {config}: too few params changed to tell anything"


def _unsupported(rank, world):
    """Each unsupported sharding raises a ValueError naming the param, and changes nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sparse_grad import SparseAdamW
    mesh = init_device_mesh("cpu", (world,))
    messages = []

    def attempt(params):
        for p in params:
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in params]
        opt = SparseAdamW(params, block_size=4, density=0.5)
        try:
            opt.step()
        except ValueError as err:
            messages.append(str(err))
        else:
            messages.append("no error")
        for p, b in zip(params, before):
            assert torch.equal(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach(),
                               b.full_tensor() if hasattr(b, "full_tensor") else b)
        assert not opt.state

    full = torch.randn(6, 10)
    attempt([torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))])
    attempt([torch.nn.Parameter(distribute_tensor(full, mesh, [Replicate()]))])
    attempt([torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])), torch.nn.Parameter(full.clone())])
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    attempt([torch.nn.Parameter(distribute_tensor(full, mesh2, [Shard(0), Shard(1)]))])
    return messages


def test_unsupported_shardings_raise(tmp_path):
    messages = spawn(_unsupported, 2, tmp_path)[0]
    assert "placements (Shard(dim=1),)" in messages[0] and "param_groups[0]['params'][0]" in messages[0]
    assert "Replicate" in messages[1]
    assert "param_groups[0]['params'][1] is a plain tensor" in messages[2]
    assert "2-D device mesh" in messages[3] and "tensor parallel" in messages[3]


def _count_reduces(rank, world, steps):
    """all_reduce calls SparseAdamW makes per step (FSDP2's own reduce-scatter is not counted)."""
    import torch.distributed as dist

    from sparse_grad.optim import sharding as _sharding
    counts, calls = [], []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    for options in ({}, {"reselect_every": 3}, {"reselect_every": 3, "max_grad_norm": 1.0}, {"density": 1.0}):
        net = fsdp(model(), world)
        opt = _distributed.optimizer(net, {**BASE, **options})
        data = _distributed.batches(steps)
        _sharding.dist.all_reduce = counting
        try:
            per_step = []
            for x, y in data:
                per = len(x) // world
                opt.zero_grad()
                _distributed.loss_of(net, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
                calls.clear()
                opt.step()
                per_step.append(list(calls))
        finally:
            _sharding.dist.all_reduce = real
        counts.append(per_step)
    return counts


def test_one_score_all_reduce_per_reselection(tmp_path):
    counts = spawn(_count_reduces, 2, tmp_path, 6)[0]
    blocks = sum(-(-p.numel() // 16) for p in model().parameters())
    every, every3, clipped, dense = counts
    assert every == [[4 * blocks]] * 6  # one fp32 score vector per step
    assert every3 == [[4 * blocks], [], []] * 2  # only at a reselection
    assert clipped == [[4 * blocks]] * 6  # clipping needs the norm every step: the same reduce
    assert dense == [[]] * 6  # density 1: nothing to select, nothing reduced


def test_fsdp1_flat_params_raise():
    """FSDP1 (which needs an accelerator to wrap a model) hands the optimizer FlatParameters: a
    rank's flat shard of several params, whose blocks would differ per rank."""
    from torch.distributed.fsdp._flat_param import FlatParameter

    from sparse_grad import SparseAdamW
    flat = FlatParameter(torch.randn(40), requires_grad=True)
    flat.grad = torch.randn(40)
    opt = SparseAdamW([torch.nn.Parameter(torch.randn(3)), flat], block_size=4)
    opt.param_groups[0]["params"][0].grad = torch.randn(3)
    before = flat.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is an FSDP1 FlatParameter"):
        opt.step()
    assert torch.equal(flat.detach(), before) and not opt.state
