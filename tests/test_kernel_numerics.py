"""Numerical building blocks of the Triton kernels, checked element by element."""
import importlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is needed for its kernels' helpers")
import triton.language as tl  # noqa: E402

from sparse_grad.backends import triton_kernels  # noqa: E402

_kernels = importlib.import_module(f"{triton_kernels().__name__}.sparse_adamw")
_round_to = _kernels._round_to
_pow_int = _kernels._pow_int


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(y_ptr + offsets, _round_to(x, tl.bfloat16), mask=offsets < n)


@triton.jit
def _pow_kernel(base_ptr, exp_ptr, out_ptr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, _pow_int(tl.load(base_ptr + i), tl.load(exp_ptr + i)))


def special_floats():
    f32 = torch.finfo(torch.float32)
    exact_ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-126 * (1 + 2**-8)])
    values = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), f32.max, -f32.max, f32.tiny,
                           f32.tiny / 3, -f32.tiny / 7, 1.0, -1.0, 3.0e38])
    nans = torch.tensor([0x7FC00000, 0x7F800001, -0x00400000, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    return torch.cat([exact_ties, values, nans, torch.randn(4000) * torch.exp(torch.randn(4000) * 10)])


def test_round_to_bf16_matches_torch_bit_for_bit(triton_case):
    device, _ = triton_case
    x = special_floats().to(device)
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=device)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.bfloat16()
    finite = ~torch.isnan(x)
    assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert torch.isnan(y[~finite]).all()


def test_pow_int_error_is_bounded_by_exponent_ulps(triton_case):
    """Repeated squaring: relative error below exponent * 2**-52, i.e. far finer than the fp32 the
    bias corrections are rounded to wherever 1 - base**s is not already 1."""
    device, _ = triton_case
    bases = torch.tensor([0.9, 0.999, 0.95, 0.5, 0.0, 0.9999] * 3, dtype=torch.float64, device=device)
    exps = torch.tensor([1, 1, 0, 7, 3, 10, 100, 1000, 12345, 3, 0, 5, 2**20, 2**31 - 1, 17, 40, 1, 999],
                        dtype=torch.int32, device=device)
    out = torch.empty_like(bases)
    _pow_kernel[(bases.numel(),)](bases, exps, out)
    expected = torch.tensor([b ** e for b, e in zip(bases.tolist(), exps.tolist())], dtype=torch.float64)
    bound = exps.cpu().double().clamp(min=1) * 2**-52 * expected.abs()
    assert ((out.cpu() - expected).abs() <= bound).all(), (out.cpu() - expected) / expected
