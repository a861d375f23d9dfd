"""The Triton selection kernels (multi-program radix select + ordered compaction) against the
reference backend and a brute-force oracle.

Runs wherever the Triton backend does (CPU tensors under TRITON_INTERPRET=1). Small ``tile``
values spread one segment over many programs, so what crosses programs (the histograms'
atomics, the scan of per-tile counts, ties split between tiles) is exercised at sizes the
interpreter runs quickly. The correctness tests run each launch sequence a plan can choose
(``VARIANTS``): tile counts summed by the compaction or by a scan launch, later passes adding
one atomic per key or a histogram per tile. The end of the file tests the first histogram pass
filled by the norm pass (``FirstPass``), on its own and inside SparseAdamW.
"""
import importlib
import math

import pytest
import torch

from sparse_grad import SparseAdamW
from sparse_grad.backends import get, topk_select, triton_kernels

from test_select_blocks import brute_force, tied_scores


# What plan() may choose, forced: (folded, sparse_keys, sub). "default" is select_blocks's own
# choice (folded, per-key atomics for tiles of few candidates, a tile's histogram in one step
# under the interpreter); "scan,histograms" also builds each histogram 4 keys at a time, as a
# GPU does 1,024 at a time.
VARIANTS = {"default": None,
            "scan,histograms": dict(folded=False, sparse_keys=0, sub=4),
            "folded,per-key": dict(folded=True, sparse_keys=2**31 - 1)}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param


def run(scores, sizes, ks, tile=None, variant="default"):
    forced = dict(VARIANTS[variant] or {})
    if "sub" in forced:  # at most the tile
        forced["sub"] = min(forced["sub"], tile or select_module().tile_size(sizes, scores.device))
    ids = triton_kernels().select_blocks(scores, sizes, ks, tile=tile, **forced)
    assert ids.dtype == torch.int64 and ids.shape == (sum(ks),) and ids.device == scores.device
    return ids


def expected(scores, sizes, ks):
    ids = get("reference").select_blocks(scores, sizes, ks)
    assert ids.tolist() == brute_force(scores.cpu(), sizes, ks)  # the reference agrees with the oracle
    assert torch.equal(ids, topk_select.select_blocks(scores, sizes, ks))
    return ids


def check(scores, sizes, ks, tile, variant="default"):
    assert torch.equal(run(scores, sizes, ks, tile, variant).cpu(), expected(scores, sizes, ks).cpu())


def select_module():
    return importlib.import_module(triton_kernels().__name__ + ".select_blocks")


def near_ties(n, device, spread=300):
    """Positive scores within ``spread`` ulps of 1.0: they share their top 21 or 22 key bits, so
    the first passes' threshold bin holds (nearly) every key and the last pass decides."""
    base = torch.tensor(1.0).view(torch.int32)
    return (base + torch.randint(0, spread, (n,), dtype=torch.int32)).view(torch.float32).to(device)


@pytest.mark.parametrize("n, k, tile", [(1, 1, 16), (2, 1, 16), (50, 7, 16), (97, 96, 32), (301, 31, 32),
                                        (300, 300, 64), (300, 0, 16), (1000, 1, 128), (4099, 613, None)])
def test_global_matches_the_reference(triton_case, variant, n, k, tile):
    device, _ = triton_case
    makers = (lambda: torch.rand(n, device=device), lambda: tied_scores(n, device),
              lambda: near_ties(n, device), lambda: -torch.rand(n, device=device))
    for make in makers:
        check(make(), [n], [k], tile, variant)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan")])
def test_all_equal_takes_the_lowest_ids(triton_case, variant, value):
    """Every key is in the threshold bin of every pass and every key ties at T."""
    device, _ = triton_case
    n = 77
    scores = torch.full((n,), value, device=device)
    for k in (0, 1, 20, n - 1, n):
        assert run(scores, [n], [k], 16, variant).tolist() == list(range(k))


def test_signed_zeros_tie_and_nan_ranks_first(triton_case, variant):
    device, _ = triton_case
    scores = torch.tensor([-0.0, 0.0, -0.0, float("nan"), -1.0, float("-inf"), 0.0, float("nan")], device=device)
    assert run(scores, [8], [2], 4, variant).tolist() == [3, 7]  # both NaN, above everything
    assert run(scores, [8], [4], 4, variant).tolist() == [0, 1, 3, 7]  # then the zeros, by id
    assert run(scores, [8], [7], 4, variant).tolist() == [0, 1, 2, 3, 4, 6, 7]  # -inf last


def test_nan_of_either_sign_and_inf_rank_above_every_number(triton_case, variant):
    device, _ = triton_case
    n = 101
    scores = torch.rand(n, device=device) * 1e30
    scores[[5, 60]] = float("inf")
    scores[[17, 90]] = float("nan")
    scores[33] = -float("nan")  # sign bit set: still NaN, still first
    scores[[3, 4, 70]] = -0.0
    for k in (1, 3, 4, 5, 6, n - 1, n):
        check(scores, [n], [k], 16, variant)
    assert run(scores, [n], [3], 16, variant).tolist() == [17, 33, 90]
    assert run(scores, [n], [5], 16, variant).tolist() == [5, 17, 33, 60, 90]


@pytest.mark.parametrize("tile", [8, 32])
def test_ties_straddling_the_threshold_go_to_the_lowest_ids(triton_case, variant, tile):
    """A run of equal scores spread over several tiles, with k ending inside it: the ties taken
    are the first ones in id order, whichever tile they are in."""
    device, _ = triton_case
    n = 131
    scores = torch.rand(n, device=device)
    tied = torch.randperm(n)[:50]
    scores[tied] = 2.0
    scores[torch.randperm(n)[:10]] = 3.0  # above the ties (may overwrite some of them)
    above = int((scores == 3.0).sum())
    ties = int((scores == 2.0).sum())
    for k in (above, above + 1, above + ties // 2, above + ties - 1, above + ties, above + ties + 1):
        check(scores, [n], [k], tile, variant)
    k = above + ties // 2
    taken = set(run(scores, [n], [k], tile, variant).tolist())
    tie_ids = sorted(torch.nonzero(scores == 2.0).flatten().tolist())
    assert [i for i in tie_ids if i in taken] == tie_ids[:ties // 2]


def test_more_threshold_bin_candidates_than_one_tile(triton_case, variant):
    """Keys that share their top 21+ bits: after each of the first two passes the threshold bin
    holds far more candidates than a tile has lanes, and they are spread over every tile."""
    device, _ = triton_case
    n = 259
    for spread in (3, 300, 2000):
        scores = near_ties(n, device, spread)
        for k in (1, 37, 130, n - 1):
            check(scores, [n], [k], 16, variant)


@pytest.mark.parametrize("tile", [8, 64, None])
def test_per_segment_with_empty_and_full_segments(triton_case, variant, tile):
    device, _ = triton_case
    sizes = [10, 0, 25, 1, 15, 3, 40, 33]
    ks = [3, 0, 25, 1, 0, 3, 9, 32]
    for scores in (tied_scores(sum(sizes), device), near_ties(sum(sizes), device)):
        check(scores, sizes, ks, tile, variant)


@pytest.mark.parametrize("k_of", [lambda n: 0, lambda n: 1, lambda n: max(n - 1, 0), lambda n: n],
                         ids=["0", "1", "n-1", "n"])
def test_per_segment_extreme_ks(triton_case, variant, k_of):
    """Scope "tensor": segments of odd sizes (partial last tiles), each with the same extreme k."""
    device, _ = triton_case
    sizes = [1, 7, 33, 2, 65, 19]
    ks = [k_of(n) for n in sizes]
    if sum(ks) == 0:
        assert run(tied_scores(sum(sizes), device), sizes, ks, 16, variant).numel() == 0
        return
    for scores in (tied_scores(sum(sizes), device), torch.randn(sum(sizes), device=device)):
        check(scores, sizes, ks, 16, variant)


def test_many_random_segments(triton_case, variant):
    device, _ = triton_case
    sizes = torch.randint(0, 40, (30,)).tolist()
    ks = [int(torch.randint(0, n + 1, ()).item()) for n in sizes]
    scores = torch.randn(sum(sizes), device=device).square()
    scores[torch.rand(scores.shape, device=device) < 0.3] = 0.5  # ties across segments too
    check(scores, sizes, ks, 16, variant)


def test_tiles_listing_their_candidates_and_tiles_summing_them_in_one_segment(triton_case, variant):
    """The last pass keeps a tile's candidates (keys with T's 22-bit prefix) as a list of digits
    where it has at most ROW_CAP of them, else as suffix sums: here tiles of both kinds, and
    tiles with none, meet in one segment, with ties at T on either side of the cut."""
    device, _ = triton_case
    module = select_module()
    n, tile = 400, 16
    scores = torch.rand(n, device=device)  # below 1.0: no candidate
    crowded = near_ties(96, device, spread=40)  # six whole tiles of candidates (> ROW_CAP each)
    scores[160:256] = crowded
    few = torch.tensor([3, 17, 40, 300, 301, 399])  # one or two candidates in other tiles
    scores[few] = crowded[torch.randint(0, 96, (len(few),))]
    assert 16 > module.ROW_CAP >= 2
    for k in (1, 5, 40, 70, 101, 102):
        check(scores, [n], [k], tile, variant)


def test_consecutive_calls_share_no_state_and_repeat_exactly(triton_case):
    """The histograms are per call: a second call over other scores (same layout, same cached
    plan) is not skewed by the first, and the same scores give the same ids every time."""
    device, _ = triton_case
    sizes, ks = [90, 41], [30, 7]
    cache = {}
    first = tied_scores(131, device)
    second = near_ties(131, device)
    ids = [triton_kernels().select_blocks(s, sizes, ks, cache) for s in (first, second, first, second)]
    assert "select_blocks" in cache
    assert torch.equal(ids[0].cpu(), expected(first, sizes, ks).cpu())
    assert torch.equal(ids[1].cpu(), expected(second, sizes, ks).cpu())
    assert torch.equal(ids[0], ids[2]) and torch.equal(ids[1], ids[3])


class Recorder:
    """Stands in for a Triton kernel: records each launch's grid and constexprs, then launches."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    module = select_module()
    recorded = []
    for name in ("_histogram_kernel", "_scan_kernel", "_compact_kernel"):
        monkeypatch.setattr(module, name, Recorder(name, getattr(module, name), recorded))
    return recorded


@pytest.mark.parametrize("n, tile, folded", [(100_003, None, None), (5_000, 256, None), (5_000, 16, False)])
def test_no_program_scans_more_than_8192_scores(triton_case, launches, n, tile, folded):
    """A large vector is spread over ceil(n / tile) programs of at most 8,192 scores each, in a
    fixed launch sequence; the tile counts are summed by the compaction programs (folded, up to
    FOLD_TILES tiles per segment) or by one scan program per segment, which reads tile counts,
    not scores."""
    device, _ = triton_case
    module = select_module()
    scores = torch.rand(n, device=device)
    k = n // 3
    plan = module.plan([n], [k], torch.device(device), tile, folded=folded)
    assert plan.folded == (folded is None)  # at most FOLD_TILES tiles: folded by default
    ids = torch.empty(k, dtype=torch.int64, device=device)
    module.launch_select_blocks(scores, ids, plan)
    assert torch.equal(ids.cpu(), expected(scores, [n], [k]).cpu())
    scan = [] if plan.folded else ["_scan_kernel"]
    assert [name for name, _, _ in launches] == ["_histogram_kernel"] * 3 + scan + ["_compact_kernel"]
    max_tile = module.MAX_TILE
    assert max_tile == 8192
    for name, grid, kwargs in launches:
        if name == "_scan_kernel":
            assert grid == (1,)  # one program per segment
            continue
        block = kwargs["BLOCK"]
        assert block <= max_tile and (tile is None or block == tile)
        assert grid == (math.ceil(n / block),)  # every score in exactly one program
    assert len({kwargs["BLOCK"] for name, _, kwargs in launches if name != "_scan_kernel"}) == 1


def test_the_scan_launch_only_for_segments_of_more_than_fold_tiles_tiles(triton_case):
    """Folded, each compaction program reads the counts of every earlier tile of its segment:
    bounded by FOLD_TILES tiles; a longer segment gets the scan program."""
    device = torch.device(triton_case[0])
    module = select_module()
    limit = module.FOLD_TILES
    assert module.plan([16 * limit], [3], device, 16).folded
    assert module.plan([5, 16 * limit, 7], [1, 3, 2], device, 16).folded
    assert not module.plan([5, 16 * limit + 1, 7], [1, 3, 2], device, 16).folded
    assert not module.plan([16 * limit + 1], [3], device, 16).folded
    assert module.plan([16 * limit + 1], [3], device, 32).folded


def test_tiles_on_a_gpu_and_explicit_tiles_stay_within_8192(triton_case):
    module = select_module()
    for device in (torch.device("cuda"), torch.device("cpu")):
        for size in (1, 100, 98_688, 10**6, 2**31 - 1):
            tile = module.tile_size([size], device)
            assert 16 <= tile <= 8192 and tile & (tile - 1) == 0
    assert module.tile_size([10**6], torch.device("cuda")) < 8192  # a large vector: many SMs
    device, _ = triton_case
    for bad in (8192 * 2, 24, 0):
        with pytest.raises(ValueError, match="tile must be a power of two"):
            run(torch.rand(100, device=device), [100], [5], tile=bad)


def test_the_host_side_power_of_two_is_tritons():
    """The tile and chunk sizes use a plain-Python next_power_of_2 (Triton's is a constexpr
    function whose host call costs several µs from Triton 3.9): the same numbers."""
    import triton

    tables = importlib_tables()
    for n in list(range(1, 5000)) + [2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31]:
        assert tables.next_power_of_2(n) == triton.next_power_of_2(n), n


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


# The first histogram pass filled by the norm pass (FirstPass): grads whose block sums of squares
# are exact in fp32 (multiples of 0.5 below 8, a few dozen per block: every square and partial
# sum is a multiple of 0.25 below 2**24 / 4), so the Triton and reference norm passes agree bit
# for bit whatever their order of summation, and the reference selection of the same grads is
# the expected one. Many blocks tie, NaN and inf grads give NaN and inf scores, -0.0 gives +0.0.
GRAD_SHAPES = [(37, torch.float32), (5, torch.bfloat16), (130, torch.float16), (1, torch.float32),
               (64, torch.bfloat16), (0, torch.float16), (23, torch.float16)]


def exact_grads(device, shapes=GRAD_SHAPES):
    grads = [(torch.randint(-6, 7, (n,)) * 0.5).to(dtype).to(device) for n, dtype in shapes]
    if shapes is not GRAD_SHAPES:
        return grads
    grads[0][3] = float("nan")
    grads[2][40] = float("inf")
    grads[2][41] = -float("inf")
    grads[4][7] = -0.0
    grads[6][:4] = 0.0
    return grads


def fused(grads, block_size, per_tensor, ks, tile=None):
    """Norm pass filling the first histogram pass, then the selection from the second pass on."""
    kernels = triton_kernels()
    sizes = [math.ceil(g.numel() / block_size) for g in grads]
    segments = sizes if per_tensor else [sum(sizes)]
    first = kernels.FirstPass.new(len(segments), per_tensor, grads[0].device)
    scores = kernels.block_sqnorms(grads, block_size, first_pass=first)
    hist = first.hist.clone()
    return scores, hist, segments, kernels.select_blocks(scores, segments, ks(segments), tile=tile, first_pass=first)


def first_digit_histogram(scores, segments):
    """What the selection's first pass counts: per segment, the top 11 bits of each rank key."""
    keys = topk_select.rank_keys(scores) >> 31  # the 32-bit order key above the id bits
    hist = torch.zeros(3, len(segments), 2048, dtype=torch.int32)
    for s, part in enumerate(torch.split(keys.cpu() >> 21, segments)):
        hist[0, s] = torch.bincount(part, minlength=2048).to(torch.int32)
    return hist.flatten()


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "tensor"])
@pytest.mark.parametrize("block_size, tile", [(1, 16), (3, 8), (16, None)])
def test_norm_pass_fills_the_first_pass_and_the_selection_matches_the_reference(triton_case, per_tensor,
                                                                                block_size, tile):
    """Several dtypes (one norm launch each: each must add only its own blocks), odd sizes, a
    tensor smaller than a block, an empty one, NaN and inf grads, extreme and middle ks."""
    device, _ = triton_case
    reference = get("reference")
    for k_of in (lambda n: min(n, 1), lambda n: n // 3, lambda n: max(n - 1, 0), lambda n: n):
        grads = exact_grads(device)
        ks = lambda segments: [k_of(n) for n in segments]  # noqa: E731
        scores, hist, segments, ids = fused(grads, block_size, per_tensor, ks, tile)
        expected_scores = reference.block_sqnorms(grads, block_size)
        assert torch.equal(scores.view(torch.int32), expected_scores.view(torch.int32))  # NaN bits included
        assert torch.equal(hist.cpu(), first_digit_histogram(scores, segments))
        assert torch.equal(ids.cpu(), expected(expected_scores, segments, ks(segments)).cpu())


def test_consecutive_fused_selections_share_no_state(triton_case):
    """Each selection gets its own histograms: a second step over other grads (same layout, same
    cached plans and tables) is not skewed by the first."""
    device, _ = triton_case
    cache = {}  # the norm pass's tables: the same grad tensors every step, as in training
    kernels = triton_kernels()
    grads = exact_grads(device)
    for step in range(3):
        for g, new in zip(grads, exact_grads(device)):
            g.copy_(new * (step + 1))
        sizes = [math.ceil(g.numel() / 4) for g in grads]
        ks = [math.ceil(0.3 * n) for n in sizes]
        first = kernels.FirstPass.new(len(sizes), True, device)
        scores = kernels.block_sqnorms(grads, 4, cache, first_pass=first)
        ids = kernels.select_blocks(scores, sizes, ks, cache, first_pass=first)
        assert torch.equal(ids.cpu(), expected(get("reference").block_sqnorms(grads, 4), sizes, ks).cpu())


def test_a_first_pass_of_another_layout_is_refused(triton_case):
    device, _ = triton_case
    first = triton_kernels().FirstPass.new(2, True, device)
    with pytest.raises(ValueError, match="first_pass holds 2 segments' histograms, segment_sizes has 3"):
        triton_kernels().select_blocks(torch.rand(9, device=device), [3, 3, 3], [1, 1, 1], first_pass=first)


OPTIMIZER_SHAPES = [(37, torch.float32), (130, torch.bfloat16), (5, torch.float32), (64, torch.bfloat16),
                    (23, torch.float32)]


def optimizer_params(device):
    return [torch.nn.Parameter(torch.randn(n, device=device).to(dtype)) for n, dtype in OPTIMIZER_SHAPES]


def blueprint_of(params, block_size):
    from sparse_grad.blueprint import Blueprint

    names = [f"p{i}" for i in range(len(params))]
    return Blueprint({n: torch.rand(math.ceil(p.numel() / block_size)) + 0.1 for n, p in zip(names, params)},
                     block_size=block_size, shapes={n: tuple(p.shape) for n, p in zip(names, params)},
                     dtypes={n: str(p.dtype) for n, p in zip(names, params)})


# (options, the histogram passes each reselecting step's selection launches)
FUSED, OWN_FIRST_PASS = [1, 2], [0, 1, 2]
OPTIMIZER_CASES = [
    ({}, FUSED),
    ({"scope": "tensor"}, FUSED),
    ({"scope": "tensor", "min_blocks_per_tensor": 2}, FUSED),  # minima are the ks: one selection
    ({"blueprint_weight": 0.0}, FUSED),  # the blueprint is not blended in
    ({"max_grad_norm": 1.0}, FUSED),
    ({"score": "rms"}, OWN_FIRST_PASS),
    ({"score_ema": 0.5}, OWN_FIRST_PASS),
    ({"blueprint_weight": 0.5}, OWN_FIRST_PASS),
    ({"min_blocks_per_tensor": 2}, OWN_FIRST_PASS * 2),  # two selections, of other scores
    ({"amp": True}, OWN_FIRST_PASS),  # the selection ranks the sums times 1/scale²
]


@pytest.mark.parametrize("options, passes", OPTIMIZER_CASES, ids=lambda c: ",".join(c) if isinstance(c, dict) else None)
def test_optimizer_selects_like_the_reference_fused_or_not(triton_case, launches, options, passes):
    """Two reselecting steps of SparseAdamW (fp32 and bf16 params) on the Triton backend select
    exactly the reference backend's blocks; the selection skips its first histogram pass where
    the norm pass filled it, and runs it where the selection ranks other scores."""
    device, _ = triton_case
    options = dict(options)
    amp = options.pop("amp", False)
    block_size = 4
    params = {name: optimizer_params(device) for name in ("triton", "reference")}
    for p, q in zip(params["triton"], params["reference"]):
        q.data.copy_(p.data)
    opts = {}
    blueprint = blueprint_of(params["triton"], block_size)  # one for both: the same scores
    for name, ps in params.items():
        kwargs = dict(density=0.3, block_size=block_size, backend=name, **options)
        if "blueprint_weight" in options:
            kwargs["blueprint"] = blueprint
            opts[name] = SparseAdamW([(f"p{i}", p) for i, p in enumerate(ps)], **kwargs)
        else:
            opts[name] = SparseAdamW(ps, **kwargs)
    scale = 2.0 ** 4  # a power of two: the unscaled sums are exact
    for step in range(2):
        grads = exact_grads(device, OPTIMIZER_SHAPES)  # finite: the params stay comparable
        launches.clear()
        for name, ps in params.items():
            for p, g in zip(ps, grads):
                p.grad = g * scale if amp else g.clone()
            if amp:
                opts[name].grad_scale = torch.full((1,), scale, device=device)
                opts[name].found_inf = torch.zeros(1, device=device)
            opts[name].step()
            if amp:
                del opts[name].grad_scale, opts[name].found_inf
        assert [kwargs["P"] for name, _, kwargs in launches if name == "_histogram_kernel"] == passes
        (_, _, ids, _), = opts["triton"].selected_blocks()
        (_, _, expected_ids, _), = opts["reference"].selected_blocks()
        assert torch.equal(ids.cpu(), expected_ids.cpu()), step
