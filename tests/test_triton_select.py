"""The Triton selection kernel (radix threshold select + compaction) against torch.topk's.

Runs wherever the Triton backend does (CPU tensors under TRITON_INTERPRET=1). Small ``chunk``
values make every segment span many loop iterations, so the carries between chunks (histogram,
ties seen, slots taken) are exercised at sizes the interpreter runs quickly.
"""
import pytest
import torch

from sparse_grad.backends import topk_select, triton_kernels

from test_select_blocks import brute_force, tied_scores


def run(scores, sizes, ks, chunk=None):
    ids = triton_kernels().select_blocks(scores, sizes, ks, chunk=chunk)
    assert ids.dtype == torch.int64 and ids.shape == (sum(ks),) and ids.device == scores.device
    return ids


def expected(scores, sizes, ks):
    ids = topk_select.select_blocks(scores, sizes, ks)
    assert ids.tolist() == brute_force(scores.cpu(), sizes, ks)  # the reference agrees with the oracle
    return ids


def near_ties(n, device):
    """Positive scores that share their top 3 bytes, so all four radix passes decide."""
    base = torch.tensor(1.0).view(torch.int32)
    return (base + torch.randint(0, 300, (n,), dtype=torch.int32)).view(torch.float32).to(device)


@pytest.mark.parametrize("n, k, chunk", [(1, 1, 16), (2, 1, 16), (50, 7, 16), (97, 96, 32), (300, 31, 16),
                                         (300, 300, 64), (300, 0, 16), (1000, 1, 128), (4099, 613, None)])
def test_global_matches_topk(triton_case, n, k, chunk):
    device, _ = triton_case
    makers = (lambda: torch.rand(n, device=device), lambda: tied_scores(n, device),
              lambda: near_ties(n, device), lambda: -torch.rand(n, device=device))
    for make in makers:
        scores = make()
        assert torch.equal(run(scores, [n], [k], chunk).cpu(), expected(scores, [n], [k]).cpu())


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan")])
def test_all_equal_takes_the_lowest_ids(triton_case, value):
    device, _ = triton_case
    scores = torch.full((77,), value, device=device)
    assert run(scores, [77], [20], chunk=16).tolist() == list(range(20))


def test_signed_zeros_tie_and_nan_ranks_first(triton_case):
    device, _ = triton_case
    scores = torch.tensor([-0.0, 0.0, -0.0, float("nan"), -1.0, float("-inf"), 0.0, float("nan")], device=device)
    assert run(scores, [8], [2], chunk=4).tolist() == [3, 7]  # both NaN, above everything
    assert run(scores, [8], [4], chunk=4).tolist() == [0, 1, 3, 7]  # then the zeros, by id
    assert run(scores, [8], [7], chunk=4).tolist() == [0, 1, 2, 3, 4, 6, 7]  # -inf last


@pytest.mark.parametrize("chunk", [8, 64, None])
def test_per_segment_with_empty_and_full_segments(triton_case, chunk):
    device, _ = triton_case
    sizes = [10, 0, 25, 1, 15, 3, 40]
    ks = [3, 0, 25, 1, 0, 3, 9]
    for scores in (tied_scores(sum(sizes), device), near_ties(sum(sizes), device)):
        assert torch.equal(run(scores, sizes, ks, chunk).cpu(), expected(scores, sizes, ks).cpu())


def test_many_random_segments(triton_case):
    device, _ = triton_case
    sizes = torch.randint(0, 40, (57,)).tolist()
    ks = [int(torch.randint(0, n + 1, ()).item()) for n in sizes]
    scores = torch.randn(sum(sizes), device=device).square()
    scores[torch.rand(scores.shape, device=device) < 0.3] = 0.5  # ties across segments too
    assert torch.equal(run(scores, sizes, ks, chunk=16).cpu(), expected(scores, sizes, ks).cpu())


def test_nothing_to_take_launches_nothing(triton_case, monkeypatch):
    from _utils import count_launches

    device, _ = triton_case
    calls = count_launches(monkeypatch, "select_blocks", "launch_select_blocks")
    assert run(torch.rand(5, device=device), [2, 3], [0, 0]).numel() == 0
    assert calls == []


def test_segment_table_is_cached(triton_case, monkeypatch):
    device, _ = triton_case
    tables = importlib_tables()
    tables.clear_cache()
    scores = torch.rand(30, device=device)
    first = run(scores, [10, 20], [2, 5])
    uploads = []
    real = tables._upload
    monkeypatch.setattr(tables, "_upload", lambda rows, dev: uploads.append(rows) or real(rows, dev))
    assert torch.equal(run(scores, [10, 20], [2, 5]), first)
    assert uploads == []  # same sizes and ks: the cached table
    run(scores, [10, 20], [3, 5])
    assert len(uploads) == 1  # another k: another table


def importlib_tables():
    import importlib

    return importlib.import_module(triton_kernels().__name__ + ".tables")


def test_more_blocks_than_int32_counts_is_refused():
    pytest.importorskip("triton")
    scores = torch.empty(2**31, device="meta")  # no memory: refused before anything runs
    with pytest.raises(ValueError, match="at most 2147483647"):
        triton_kernels().select_blocks(scores, [2**31], [1])
