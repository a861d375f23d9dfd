import textwrap

import pytest
import torch

from sparse_grad import ops
from _utils import assert_script_prints_ok, count_launches, heavy_tailed

SHAPES = [(37,), (5, 13), (1,), (0,), (3, 4, 5), (200,), (16,)]


def sqnorms_fp64(tensors, block_size):
    """Independent oracle: float64 sums over explicit slices."""
    out = []
    for t in tensors:
        flat = t.reshape(-1).double().cpu()
        out += [flat[i:i + block_size].square().sum().item() for i in range(0, flat.numel(), block_size)]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5),
                                         (torch.float16, 1e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("block_size", [1, 7, 16, 64, 1000])
def test_matches_float64(case, dtype, rtol, block_size):
    device, backend = case
    tensors = [heavy_tailed(s, dtype, device) for s in SHAPES]
    scores = ops.block_sqnorms(tensors, block_size, backend=backend)
    assert scores.dtype == torch.float32 and scores.device.type == device
    # The inputs are exact in every dtype; the only error is fp32 accumulation and rounding.
    torch.testing.assert_close(scores.double().cpu(), sqnorms_fp64(tensors, block_size), rtol=rtol, atol=0)


def test_one_launch_per_dtype(triton_case, monkeypatch):
    device, backend = triton_case
    launches = count_launches(monkeypatch, "block_sqnorms", "launch_block_sqnorms")
    tensors = [heavy_tailed((n,), device=device) for n in torch.randint(1, 50, (40,)).tolist()]
    scores = ops.block_sqnorms(tensors, 32, backend=backend)
    assert len(launches) == 1  # 40 tensors, one launch
    torch.testing.assert_close(scores.double().cpu(), sqnorms_fp64(tensors, 32), rtol=1e-5, atol=0)

    launches.clear()
    mixed = [heavy_tailed(s, d, device) for s, d in
             zip([(33,), (8, 5), (3,), (70,)], [torch.float32, torch.bfloat16, torch.float32, torch.float16])]
    scores = ops.block_sqnorms(mixed, 16, backend=backend)
    assert sorted(str(args[-1]) for args, _ in launches) == ["torch.bfloat16", "torch.float16", "torch.float32"]
    torch.testing.assert_close(scores.double().cpu(), sqnorms_fp64(mixed, 16), rtol=1e-5, atol=0)


def test_mixed_dtypes(case):
    device, backend = case
    tensors = [heavy_tailed(s, d, device) for s, d in
               zip([(33,), (8, 5), (3,), (70,), (9,)],
                   [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32])]
    scores = ops.block_sqnorms(tensors, 16, backend=backend)
    torch.testing.assert_close(scores.double().cpu(), sqnorms_fp64(tensors, 16), rtol=1e-5, atol=0)


def test_backends_agree(case):
    device, backend = case
    tensors = [heavy_tailed(s, device=device) for s in SHAPES]
    ref = ops.block_sqnorms([t.cpu() for t in tensors], 8, backend="reference")
    torch.testing.assert_close(ops.block_sqnorms(tensors, 8, backend=backend).cpu(), ref, rtol=2e-6, atol=0)


def test_empty_inputs(case):
    device, backend = case
    assert ops.block_sqnorms([], 8, backend=backend).numel() == 0
    out = ops.block_sqnorms([torch.empty(0, device=device)], 8, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"tensors\[1\] is not contiguous"):
        ops.block_sqnorms([torch.randn(4), torch.randn(3, 3).t()], 4)
    with pytest.raises(ValueError, match="block_size"):
        ops.block_sqnorms([torch.randn(4)], 0)
    with pytest.raises(TypeError, match="list of tensors"):
        ops.block_sqnorms(torch.randn(4), 4)
    with pytest.raises(ValueError, match="backend"):
        ops.block_sqnorms([torch.randn(4)], 4, backend="cuda-graphs")


INT64_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from sparse_grad.backends import triton_kernels
    kernels = triton_kernels()
    device, block_size = {device!r}, 64
    # A "virtual" tensor of 2**31 + 202 elements whose last 202 live in x: it starts 2**31
    # elements before x, and global block 0 is its local block 2**31 / 64.
    skip = 2**31
    x = torch.randn(202, device=device)
    offsets = torch.tensor([-skip], device=device)
    numels = torch.tensor([skip + x.numel()], device=device)
    first_block = torch.tensor([-(skip // block_size)], device=device)
    block_tensor = torch.zeros(4, dtype=torch.int32, device=device)
    groups = torch.zeros(1, dtype=torch.int64, device=device)
    out = torch.full((4,), float("nan"), device=device)
    kernels.launch_block_sqnorms(out, x, offsets, numels, first_block, block_tensor, groups,
                                 block_size, 0, torch.float32)
    expected = F.pad(x.double(), (0, 54)).view(4, 64).square().sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    print("ok")
""")


def test_int64_offsets_past_2_31(triton_case):
    """Elements past 2**31 are addressed correctly, without allocating such a tensor."""
    device, _ = triton_case
    assert_script_prints_ok(INT64_SCRIPT.format(device=device))


def test_vector_width_needs_every_tensor_and_every_block_on_16_bytes(triton_case):
    from sparse_grad.backends import triton_kernels
    import importlib

    tables = importlib.import_module(triton_kernels().__name__ + ".tables")
    device, _ = triton_case
    buffer = torch.zeros(256, device=device)
    aligned = [buffer[:100], buffer[128:]]  # the caching allocator aligns storages far beyond 16 bytes
    assert tables.vector_width(aligned, 64) == 4
    assert tables.vector_width([t.bfloat16() for t in aligned], 64) == 8
    assert tables.vector_width([t.double() for t in aligned], 64) == 2
    assert tables.vector_width(aligned, 6) == 1  # block 1 would start 24 bytes in
    assert tables.vector_width(aligned + [buffer[3:50]], 64) == 1  # one view 12 bytes in: all scalar
    assert tables.vector_width([buffer[4:50]], 64) == 4  # 16 bytes in


@pytest.mark.parametrize("block_size", [8, 64])
def test_views_at_every_offset_and_full_versus_partial_blocks(triton_case, block_size):
    """Views of one buffer at element offsets 0..7 (the group then loads scalars) and an
    aligned group (16-byte loads on a GPU); a full block and a partial one holding the same
    values, the full one with a trailing zero, sum to the same bits: the unmasked path adds
    lane for lane what the masked path adds."""
    device, backend = triton_case
    buffer = heavy_tailed((4096,), device=device)
    views = [buffer[i:i + 3 * block_size + i] for i in range(8)]
    aligned = [heavy_tailed((n,), device=device) for n in (block_size, 5 * block_size + 3, 2 * block_size)]
    for tensors in (views, aligned, aligned + views):
        scores = ops.block_sqnorms(tensors, block_size, backend=backend)
        torch.testing.assert_close(scores.double().cpu(), sqnorms_fp64(tensors, block_size), rtol=1e-5, atol=0)
    full = heavy_tailed((block_size,), device=device)
    full[-1] = 0.0
    scores = ops.block_sqnorms([full, full[:-1].clone()], block_size, backend=backend)
    assert scores[0].view(torch.int32) == scores[1].view(torch.int32)


def test_memory_off_its_element_alignment_is_refused(triton_case):
    """torch.frombuffer can place a float at an odd address; offsets in elements cannot reach
    it, so the Triton backend refuses it instead of reading a fraction of an element off."""
    device, backend = triton_case
    if device != "cpu":
        pytest.skip("frombuffer makes CPU tensors")
    buffer = bytearray(4 * 40 + 1)
    odd = torch.frombuffer(buffer, dtype=torch.float32, count=40, offset=1)
    with pytest.raises(ValueError, match="not aligned to its element size"):
        ops.block_sqnorms([torch.randn(8), odd], 8, backend=backend)
