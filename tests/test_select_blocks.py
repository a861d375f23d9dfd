import math

import pytest
import torch

from sparse_grad import ops
from sparse_grad.ops import BlockLayout, num_selected


def brute_force(scores, sizes, ks):
    """Independent oracle: rank each segment with Python's sort on (score desc, id asc)."""
    chosen, start = [], 0
    values = scores.tolist()
    for size, k in zip(sizes, ks):
        def rank(i):
            v = values[i]
            return (0, 0.0, i) if math.isnan(v) else (1, -v, i)
        chosen += sorted(range(start, start + size), key=rank)[:k]
        start += size
    return sorted(chosen)


def tied_scores(n, device):
    """Scores with many exact ties, zeros of both signs, infinities and NaN."""
    pool = torch.tensor([0.0, -0.0, 1.0, 2.5, 2.5, float("inf"), 1e-30, 3.0, float("nan"), -1.0])
    return pool[torch.randint(0, len(pool), (n,))].to(device)


@pytest.mark.parametrize("n, k", [(1, 1), (50, 7), (50, 0), (50, 50), (97, 96), (300, 31)])
def test_global_exact(case, n, k):
    device, backend = case
    for scores in (torch.rand(n, device=device), tied_scores(n, device)):
        ids = ops.select_blocks(scores, k, backend=backend)
        assert ids.dtype == torch.int64 and ids.device.type == device
        assert ids.tolist() == brute_force(scores.cpu(), [n], [k])


@pytest.mark.parametrize("sizes", [[10, 25, 15], [1, 0, 7, 1, 40], [64]])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_per_segment_density(case, sizes, density):
    device, backend = case
    scores = tied_scores(sum(sizes), device)
    ids = ops.select_blocks(scores, density=density, segments=sizes, backend=backend)
    ks = [math.ceil(density * n - 1e-9) for n in sizes]
    assert all(k >= 1 for k, n in zip(ks, sizes) if n)  # every non-empty tensor keeps a block
    assert ids.tolist() == brute_force(scores.cpu(), sizes, ks)


def test_per_segment_counts_and_layout(case):
    device, backend = case
    layout = BlockLayout([torch.empty(40), torch.empty(0), torch.empty(3, 30)], block_size=8)
    scores = torch.rand(layout.num_blocks, device=device)
    ids = ops.select_blocks(scores, [2, 0, 5], segments=layout, backend=backend)
    assert ids.tolist() == brute_force(scores.cpu(), list(layout.block_counts), [2, 0, 5])


def test_backends_agree_on_large_random(case):
    device, backend = case
    scores = torch.randn(5000, device=device).square()
    scores[::7] = scores[3]  # plenty of ties
    expected = ops.select_blocks(scores.cpu(), 613, backend="reference")
    assert torch.equal(ops.select_blocks(scores, 613, backend=backend).cpu(), expected)


def test_num_selected_uses_decimal_density():
    assert num_selected(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in binary floats
    assert num_selected(0.1, 10) == 1
    assert num_selected(0.05, 1) == 1
    assert num_selected(1.0, 7) == 7
    assert num_selected(0.07, 100) == 7
    assert num_selected(0.5, 0) == 0


def test_bad_inputs():
    scores = torch.rand(10)
    with pytest.raises(ValueError, match="k must be in"):
        ops.select_blocks(scores, 11)
    with pytest.raises(ValueError, match="k must be in"):
        ops.select_blocks(scores, -1)
    with pytest.raises(TypeError, match="exactly one of k and density"):
        ops.select_blocks(scores, 3, density=0.5)
    with pytest.raises(TypeError, match="exactly one of k and density"):
        ops.select_blocks(scores)
    with pytest.raises(ValueError, match="density"):
        ops.select_blocks(scores, density=0.0)
    with pytest.raises(ValueError, match="density"):
        ops.select_blocks(scores, density=1.5)
    with pytest.raises(TypeError, match="scores must be a 1-D float32"):
        ops.select_blocks(scores.double(), 3)
    with pytest.raises(TypeError, match="scores must be a 1-D float32"):
        ops.select_blocks(scores.view(2, 5), 3)
    with pytest.raises(ValueError, match="segments cover 9 blocks"):
        ops.select_blocks(scores, density=0.5, segments=[4, 5])
    with pytest.raises(TypeError, match="one count per segment"):
        ops.select_blocks(scores, 2, segments=[5, 5])
    with pytest.raises(ValueError, match=r"k\[1\] must be in \[0, 5\]"):
        ops.select_blocks(scores, [2, 6], segments=[5, 5])
    with pytest.raises(TypeError, match=r"segments\[0\]"):
        ops.select_blocks(scores, density=0.5, segments=[-1, 11])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("segments", [None, [300, 700, 24]])
def test_cuda_selection_never_syncs(segments):
    scores = torch.rand(1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = ops.select_blocks(scores, density=0.1, segments=segments, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sizes = segments or [1024]
    assert ids.tolist() == brute_force(scores.cpu(), sizes, [num_selected(0.1, n) for n in sizes])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton_select", [True, False], ids=["cuda-radix", "cuda-topk-fallback"])
@pytest.mark.parametrize("segments", [None, [300, 0, 700, 24, 1]])
def test_cuda_backend_selection_both_paths(monkeypatch, triton_select, segments):
    """The cuda backend's selection: Triton's radix select, and torch.topk where Triton is missing."""
    from sparse_grad.backends import native
    monkeypatch.setitem(native._GPU_SELECT, "triton", triton_select)
    torch.manual_seed(3)
    scores = torch.rand(1025, device="cuda") ** 6
    scores[::7] = scores[3]  # ties across the threshold
    scores[5], scores[9] = float("nan"), -0.0
    sizes = segments or [1025]
    for density in (0.01, 0.3, 1.0):
        ids = ops.select_blocks(scores, density=density, segments=segments, backend="cuda")
        assert ids.tolist() == brute_force(scores.cpu(), sizes, [num_selected(density, n) for n in sizes])


def test_num_selected_still_rounds_up_real_excess():
    assert num_selected(0.30000001, 10) == 4
    assert num_selected(0.2, 11) == 3
