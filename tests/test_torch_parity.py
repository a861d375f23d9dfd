"""SparseAdamW at density 1 against torch.optim.AdamW, checked the way torch checks its own
optimizers: bit for bit where the same arithmetic runs (the reference backend), and through the
generic optimizer inputs torch ships for AdamW."""
from __future__ import annotations

import pytest
import torch
from _utils import heavy_tailed

from sparse_grad import SparseAdamW

SHAPES = [(37, 5), (3,), (4, 4, 5), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [7, 16])
@pytest.mark.parametrize("foreach", [False, True])
def test_reference_backend_is_bit_identical_to_torch_adamw(dtype, block_size, foreach):
    # torch computes the bias corrections on the host in Python floats (one correctly rounded
    # division): the reference backend does the same per distinct block step count, so even fp64
    # parameters agree to the last bit.
    params = [torch.nn.Parameter(heavy_tailed(s, dtype)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = SparseAdamW(params, density=1.0, block_size=block_size, backend="reference", **hyper)
    adamw = torch.optim.AdamW(theirs, foreach=foreach, **hyper)
    for _ in range(12):
        for p, q in zip(params, theirs):
            p.grad = heavy_tailed(p.shape, dtype)
            q.grad = p.grad.clone()
        ours.step()
        adamw.step()
    for p, q in zip(params, theirs):
        assert torch.equal(p, q), (p - q).abs().max()
        assert torch.equal(ours.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"])


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (its dims stored in reverse order)."""
    order = list(range(t.dim()))[::-1]
    inverse = [order.index(d) for d in range(t.dim())]
    return t.permute(order).clone(memory_format=torch.contiguous_format).permute(inverse)


@pytest.mark.parametrize("options", [dict(density=1.0), dict(density=0.4, error_feedback=True),
                                     dict(density=0.4, state_layout="compact", reselect_every=2)])
def test_strided_params_step_like_contiguous_ones(case, options):
    # torch.optim.AdamW accepts non-contiguous params; blocks follow the logical (row-major)
    # element order, so a strided param steps exactly like a contiguous one with its values.
    device, backend = case
    values = [heavy_tailed(s, device=device) for s in [(13, 7), (5, 3, 4), (9,)]]
    strided = [torch.nn.Parameter(_strided(v)) for v in values]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    kwargs = dict(lr=1e-2, block_size=8, backend=backend, **options)
    ours, twin = SparseAdamW(strided, **kwargs), SparseAdamW(plain, **kwargs)
    theirs = [torch.nn.Parameter(_strided(v)) for v in values]
    adamw = torch.optim.AdamW(theirs, lr=1e-2)
    for _ in range(4):
        for p, q, r in zip(strided, plain, theirs):
            q.grad = heavy_tailed(q.shape, device=device)
            p.grad, r.grad = _strided(q.grad), q.grad.clone()
        ours.step(), twin.step(), adamw.step()
    for p, q, r in zip(strided, plain, theirs):
        assert p.stride() == r.stride()  # updated in place, layout kept
        assert torch.equal(p, q)
        if options["density"] == 1.0:
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-5)


def _common_optimizers():
    # torch's own optimizer test inputs; importing them needs the expecttest package (a test extra)
    return pytest.importorskip("torch.testing._internal.common_optimizers")

# torch's error inputs for AdamW that SparseAdamW answers differently on purpose (README: Drop-in).
ACCEPTED = {  # inputs torch refuses and SparseAdamW runs: its kernels read tensor betas/lr on device under any flags
    "lr as Tensor doesn't work with foreach & not capturable",
    "betas must be either both floats or both Tensors",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
}
STRICTER = {  # torch warns and goes on; two updates of one tensor per step would race in the kernels
    "a param group cannot have duplicate parameters": ValueError,
}


def _torch_params(dtype):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_adamw_generic_inputs_at_density_one(case, dtype):
    device, backend = case
    for optim_input in _common_optimizers().optim_inputs_func_adamw(device, dtype):
        kwargs = dict(optim_input.kwargs)
        params = [p.to(device) for p in _torch_params(dtype)]
        if kwargs.get("amsgrad"):
            with pytest.raises(ValueError, match="amsgrad=True is not supported"):
                SparseAdamW(params, density=1.0, **kwargs)
            continue
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours = SparseAdamW([torch.nn.Parameter(p) for p in params], density=1.0, block_size=16, backend=backend,
                           **kwargs)
        adamw = torch.optim.AdamW(theirs, **kwargs)
        mine = ours.param_groups[0]["params"]
        for _ in range(5):
            for p, q in zip(mine, theirs):
                p.grad = heavy_tailed(p.shape, dtype, device)
                q.grad = p.grad.clone()
            ours.step()
            adamw.step()
        for p, q in zip(mine, theirs):
            if backend == "reference":
                assert torch.equal(p, q), optim_input.desc
            else:  # fp32 fused kernels round like torch's vectorized AdamW, up to an ulp per step
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=optim_input.desc)


def test_torch_adamw_error_inputs():
    common_optimizers = _common_optimizers()
    for error_input in common_optimizers.optim_error_inputs_func_adamw("cpu", torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs, desc = optim_input.params, optim_input.kwargs, optim_input.desc
        assert error_input.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR, desc
        if desc in ACCEPTED:
            opt = SparseAdamW(_torch_params(torch.float32), density=1.0, **kwargs)
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            opt.step()
            assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"]), desc
        elif desc in STRICTER:
            with pytest.raises(STRICTER[desc]):
                SparseAdamW(params, **kwargs)
        else:
            with pytest.raises(error_input.error_type):
                SparseAdamW(params, **kwargs)
