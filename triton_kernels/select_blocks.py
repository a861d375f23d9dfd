"""Exact top-k block selection on many programs: a three-pass radix select, then an ordered compaction.

Every score becomes an unsigned 32-bit rank key, ordered like the scores (NaN above everything,
-0.0 equal to +0.0). Each segment's k-th largest key T is found one digit at a time, most
significant first (11, 11 and 10 bits): every tile of at most ``MAX_TILE`` scores counts the
digit of its keys that share the digits found so far (its candidates) into its segment's
histogram in global memory, with integer atomics (the sums, hence T, are deterministic): one per
non-empty bin of a shared-memory histogram of the tile, or one per candidate where the tile has
few (past the first pass, on heavy-tailed scores, tens per tile). Nothing is read back between
passes: each program of the next kernel re-derives the digits found so far from the finished
histograms (a cumulative sum over 2,048 bins, cheaper than a launch of its own). The last pass
also stores, per tile, its keys above T's 22-bit prefix, its candidates' count, and their last
digits (at most ``ROW_CAP``) or the suffix sums of their histogram; from these, knowing T, each
tile's keys > T and == T follow. Every compaction program sums them over the tiles before it in
its segment (a separate scan program per segment only where a segment has more than
``FOLD_TILES`` tiles), then writes its chosen ids to their final slots: all keys > T and the
ties == T of lowest id until exactly k are taken. The ids come out ascending without a sort,
the output size is known on the host (the sum of the ks), and no program reads more than
``MAX_TILE`` scores: no host sync, a fixed launch sequence (CUDA-graph capturable), and work
spread over ``ceil(n / tile)`` programs instead of one program per segment.

The reference it is tested against is ``sparse_grad.backends.topk_select`` (torch.topk on
unique (score, id) keys), which agrees with the reference backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .tables import cached_tables, next_power_of_2

# Counts within a segment (keys still to take, ties seen, slots taken) are int32.
MAX_BLOCKS = 2**31 - 1
# No program reads more scores than this: a large vector is spread over many programs.
MAX_TILE = 8192
# Histogram bins per pass: digits of 11, 11 and 10 bits cover the 32-bit key in three passes.
BINS = 2048
NUM_PASSES = 3
# What the last pass keeps per tile for the counts of its keys > T and == T: the last digits of
# its candidates (keys with T's 22-bit prefix) where it has at most ROW_CAP of them, else the
# suffix sums of their histogram (a row of BINS // 2 int32).
ROW_CAP = 8
ROW = BINS // 2
# Segments of at most this many tiles need no scan launch: each compaction program adds up the
# counts of the tiles before it in its segment (at most FOLD_TILES * (2 + ROW_CAP) int32 reads).
FOLD_TILES = 1024
FOLD_CHUNK = 256  # tiles per iteration of that sum


@triton.jit
def _key_of(x):
    """uint32 rank keys of fp32 values ``x``, larger = ranked first."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, bits ^ bits, bits)  # -0.0 -> +0.0: zeros tie
    negative = (bits >> 31) == 1
    # IEEE bits -> unsigned integers in the order of the floats: flip negatives, set the sign bit
    # of positives.
    keys = tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # not `~`: the interpreter fails on it
    return tl.where(x != x, 0xFFFFFFFF, keys)  # NaN ranks highest


@triton.jit
def _rank_keys(scores_ptr, offsets, valid):
    """uint32 keys, larger = ranked first; lanes that are not ``valid`` get 0."""
    x = tl.load(scores_ptr + offsets, mask=valid, other=0.0)
    keys = _key_of(x)
    return tl.where(valid, keys, keys ^ keys)


@triton.jit
def _digit(keys, P: tl.constexpr):
    """The digit pass ``P`` histograms: key bits [21, 32), [10, 21), [0, 10)."""
    if P == 0:
        d = keys >> 21
    elif P == 1:
        d = (keys >> 10) & 0x7FF
    else:
        d = keys & 0x3FF
    return d.to(tl.int32)


@triton.jit
def _prefix(keys, P: tl.constexpr):
    """The digits above pass ``P``'s (P > 0), to compare with the prefix found so far."""
    if P == 1:
        p = keys >> 21
    else:
        p = keys >> 10
    return p


@triton.jit
def _threshold(hist_ptr, segment, num_segments, k, PASSES: tl.constexpr, BINS: tl.constexpr):
    """(digits of T found by the first ``PASSES`` passes, keys == that prefix still to take).

    After a pass the keys above the prefix are all taken: T's digit is the largest d such that
    at least ``need`` keys with the prefix have a digit >= d. With k == 0 every digit is the
    largest, so T is the largest key and nothing is above it.
    """
    bins = tl.arange(0, BINS)
    need = k.to(tl.int32)
    prefix = tl.zeros([], dtype=tl.uint32)
    for p in tl.static_range(PASSES):
        hist = tl.load(hist_ptr + (p * num_segments + segment) * BINS + bins)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        if p < 2:
            fits = at_least >= need
        else:  # a 10-bit digit: k == 0 must not pick a bin the key cannot hold
            fits = (at_least >= need) & (bins < BINS // 2)
        digit = tl.max(tl.where(fits, bins, 0), axis=0)
        need -= tl.sum(tl.where(bins == digit, at_least - hist, 0), axis=0)
        if p < 2:
            prefix = (prefix << 11) | digit.to(tl.uint32)
        else:
            prefix = (prefix << 10) | digit.to(tl.uint32)
    return prefix, need


@triton.jit
def _tile(tiles_ptr, segments_ptr, num_tiles, num_segments, BLOCK: tl.constexpr):
    """This program's tile: its segment, its k, its first and end ids, its ids and which lanes
    hold one."""
    tile = tl.program_id(0).to(tl.int64)
    segment = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    k = tl.load(segments_ptr + 2 * num_segments + segment)
    index = start + tl.arange(0, BLOCK)
    return tile, segment, k, start, end, index, index < end


@triton.jit
def _add_histogram(hist_row_ptr, scores_ptr, start, end, prefix, P: tl.constexpr, BLOCK: tl.constexpr,
                   SUB: tl.constexpr, NBINS: tl.constexpr):
    """Counts the digits of the tile's candidates (its keys with ``prefix``; every key in the
    first pass) in shared memory, ``SUB`` keys at a time, then adds the tile's non-empty bins to
    the segment's histogram: one relaxed atomic per bin, not per key. Returns the tile's counts.

    ``SUB`` < ``BLOCK`` on a GPU: Triton 3.6 builds ``tl.histogram`` from per-bit warp votes,
    every thread holding NBINS / 32 counters, and over a whole tile (8 or 16 keys a thread) that
    took 164-195 registers per thread (compiled for sm_90, tiles of 1,024 and 4,096); two keys a
    thread per step (read again, from cache) take 63-92. Triton 3.9 counts with shared-memory
    atomics and needs 30-120 either way."""
    local = tl.zeros([NBINS], dtype=tl.int32)
    for lo in range(0, BLOCK, SUB):
        index = start + lo + tl.arange(0, SUB)
        valid = index < end
        keys = _rank_keys(scores_ptr, index, valid)
        if P > 0:
            valid = valid & (_prefix(keys, P) == prefix)
        local += tl.histogram(_digit(keys, P), NBINS, mask=valid)
    tl.atomic_add(hist_row_ptr + tl.arange(0, NBINS), local, mask=local > 0, sem="relaxed")
    return local


@triton.jit
def _tile_counts(scratch_ptr, index, valid, num_tiles, digit, limit,
                 ROW_CAP: tl.constexpr, ROW: tl.constexpr):
    """Per tile of ``index``: (its keys > T, its keys == T), T's last digit being ``digit``, from
    what the last histogram pass stored: the keys above T's prefix, the candidates (keys with the
    prefix), and their digits (at most ``limit`` candidates) or their suffix sums (more)."""
    above = tl.load(scratch_ptr + index, mask=valid, other=0)
    candidates = tl.load(scratch_ptr + num_tiles + index, mask=valid, other=0)
    row = scratch_ptr + 3 * num_tiles + index * ROW
    listed = candidates <= limit
    slots = tl.arange(0, ROW_CAP)
    digits = tl.load(row[:, None] + slots[None, :],
                     mask=(valid & listed)[:, None] & (slots[None, :] < candidates[:, None]), other=-1)
    listed_above = tl.sum((digits > digit).to(tl.int32), axis=1)
    listed_ties = tl.sum((digits == digit).to(tl.int32), axis=1)
    # Suffix sums: entry d holds the candidates with a last digit >= d; none is above the largest.
    summed = valid & (candidates > limit)
    larger = tl.load(row + digit + 1, mask=summed & (digit + 1 + index * 0 < ROW), other=0)
    at_digit = tl.load(row + digit, mask=summed, other=0)
    return above + tl.where(listed, listed_above, larger), tl.where(listed, listed_ties, at_digit - larger)


@triton.jit
def _histogram_kernel(
    scores_ptr,  # fp32 [num_blocks]
    tiles_ptr,  # int64 [3, num_tiles]: segment, first id, end id of each tile
    segments_ptr,  # int64 [6, S]: first block, blocks, k, first output slot, first tile, tiles
    hist_ptr,  # int32 [NUM_PASSES, S, BINS], zero before the first pass
    # int32 [(3 + ROW) * num_tiles], written by the last pass: per tile, its keys above T's 22-bit
    # prefix, its candidates (keys with that prefix), [a slot for the scan], then its row
    scratch_ptr,
    num_tiles,
    num_segments,
    sparse_keys,  # at most this many candidates: one atomic per key, not a histogram
    P: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,  # keys per step of a tile's histogram
    BINS: tl.constexpr,
    ROW_CAP: tl.constexpr,
):
    tile, segment, k, start, end, index, valid = _tile(tiles_ptr, segments_ptr, num_tiles, num_segments, BLOCK)
    hist_row = hist_ptr + (P * num_segments + segment) * BINS
    if P == 0:  # every key
        _add_histogram(hist_row, scores_ptr, start, end, 0, P, BLOCK, SUB, BINS)
    else:  # only the keys that share the digits found so far
        keys = _rank_keys(scores_ptr, index, valid)
        digits = _digit(keys, P)
        prefix, need = _threshold(hist_ptr, segment, num_segments, k, P, BINS)
        candidates = valid & (_prefix(keys, P) == prefix)
        count = tl.sum(candidates.to(tl.int32), axis=0)
        if P == 1:
            # Past the first pass few keys share T's prefix (on heavy-tailed scores, tens per
            # tile): an atomic each skips the tile's shared-memory histogram (zeroing 2,048
            # bins, a barrier, a masked pass over them to add the non-empty ones).
            if count <= sparse_keys:
                tl.atomic_add(hist_row + digits, 1, mask=candidates, sem="relaxed")
            else:
                _add_histogram(hist_row, scores_ptr, start, end, prefix, P, BLOCK, SUB, BINS)
        else:
            # Every key above T's prefix is above T, whatever T's last digit turns out to be.
            tl.store(scratch_ptr + tile, tl.sum((valid & (_prefix(keys, P) > prefix)).to(tl.int32), axis=0))
            tl.store(scratch_ptr + num_tiles + tile, count)
            row = scratch_ptr + 3 * num_tiles + tile * (BINS // 2)
            # What the counts of keys > T and == T need once T's last digit is known: no kernel
            # of its own re-reads the scores for them.
            if count <= tl.minimum(sparse_keys, ROW_CAP):
                tl.atomic_add(hist_row + digits, 1, mask=candidates, sem="relaxed")
                slot = tl.cumsum(candidates.to(tl.int32), axis=0) - 1
                tl.store(row + slot, digits, mask=candidates)
            else:
                local = _add_histogram(hist_row, scores_ptr, start, end, prefix, P, BLOCK, SUB, BINS // 2)
                tl.store(row + tl.arange(0, BINS // 2), tl.sum(local, axis=0) - tl.cumsum(local, axis=0) + local)


@triton.jit
def _scan_kernel(
    segments_ptr, hist_ptr, scratch_ptr,
    bases_ptr,  # int64 [num_tiles + 2 S]: first output slot of each tile, then T and need per segment
    num_tiles, num_segments, sparse_keys,
    CHUNK: tl.constexpr, BINS: tl.constexpr, NUM_PASSES: tl.constexpr, ROW_CAP: tl.constexpr,
):
    """One program per segment of more than FOLD_TILES tiles: each tile's first output slot and
    the segment's ties before it (in the scratch slot between the counts and the rows)."""
    segment = tl.program_id(0).to(tl.int64)
    k = tl.load(segments_ptr + 2 * num_segments + segment)
    out_start = tl.load(segments_ptr + 3 * num_segments + segment)
    first_tile = tl.load(segments_ptr + 4 * num_segments + segment)
    tiles = tl.load(segments_ptr + 5 * num_segments + segment)
    threshold, need = _threshold(hist_ptr, segment, num_segments, k, NUM_PASSES, BINS)
    digit = _digit(threshold, NUM_PASSES - 1).to(tl.int64)
    limit = tl.minimum(sparse_keys, ROW_CAP)
    lanes = tl.arange(0, CHUNK)
    above_carry = need * 0
    ties_carry = need * 0
    offset = tiles * 0
    while offset < tiles:
        index = first_tile + offset + lanes
        valid = offset + lanes < tiles
        above, ties = _tile_counts(scratch_ptr, index, valid, num_tiles, digit, limit, ROW_CAP, BINS // 2)
        above_before = above_carry + tl.cumsum(above, axis=0) - above
        ties_before = ties_carry + tl.cumsum(ties, axis=0) - ties
        # Every key > T of an earlier tile is taken, and the earlier ties up to `need`.
        base = out_start + above_before.to(tl.int64) + tl.minimum(ties_before, need).to(tl.int64)
        tl.store(bases_ptr + index, base, mask=valid)
        tl.store(scratch_ptr + 2 * num_tiles + index, ties_before, mask=valid)
        above_carry += tl.sum(above, axis=0)
        ties_carry += tl.sum(ties, axis=0)
        offset += CHUNK
    tl.store(bases_ptr + num_tiles + segment, threshold.to(tl.int64))
    tl.store(bases_ptr + num_tiles + num_segments + segment, need.to(tl.int64))


@triton.jit
def _compact_kernel(
    scores_ptr, tiles_ptr, segments_ptr, hist_ptr, scratch_ptr,
    bases_ptr,  # what the scan wrote (not FOLDED)
    out_ptr,  # int64 [sum of ks]
    num_tiles, num_segments, sparse_keys,
    BLOCK: tl.constexpr, FOLDED: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
    NUM_PASSES: tl.constexpr, ROW_CAP: tl.constexpr,
):
    tile, segment, k, start, end, index, valid = _tile(tiles_ptr, segments_ptr, num_tiles, num_segments, BLOCK)
    keys = _rank_keys(scores_ptr, index, valid)  # first: its latency overlaps what follows
    if FOLDED:  # this program sums the counts of the tiles before it: no scan launch
        threshold, need = _threshold(hist_ptr, segment, num_segments, k, NUM_PASSES, BINS)
        digit = _digit(threshold, NUM_PASSES - 1).to(tl.int64)
        limit = tl.minimum(sparse_keys, ROW_CAP)
        out_start = tl.load(segments_ptr + 3 * num_segments + segment)
        earlier = tl.load(segments_ptr + 4 * num_segments + segment)
        lanes = tl.arange(0, CHUNK)
        above_before = need * 0
        ties_before = need * 0
        while earlier < tile:
            index_before = earlier + lanes
            above, ties = _tile_counts(scratch_ptr, index_before, index_before < tile, num_tiles, digit, limit,
                                       ROW_CAP, BINS // 2)
            above_before += tl.sum(above, axis=0)
            ties_before += tl.sum(ties, axis=0)
            earlier += CHUNK
        base = out_start + above_before.to(tl.int64) + tl.minimum(ties_before, need).to(tl.int64)
    else:
        threshold = tl.load(bases_ptr + num_tiles + segment).to(tl.uint32)
        need = tl.load(bases_ptr + num_tiles + num_segments + segment).to(tl.int32)
        base = tl.load(bases_ptr + tile)
        ties_before = tl.load(scratch_ptr + 2 * num_tiles + tile)
    above = valid & (keys > threshold)
    tie = (valid & (keys == threshold)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
    chosen = (above | ((tie == 1) & (tie_rank < need))).to(tl.int32)
    slot = base + (tl.cumsum(chosen, axis=0) - chosen).to(tl.int64)
    tl.store(out_ptr + slot, index, mask=chosen == 1)


@dataclass(frozen=True)
class Plan:
    """What a selection over one layout launches: device tables and host-side sizes."""

    sizes: tuple[int, ...]
    ks: tuple[int, ...]
    tiles: torch.Tensor  # int64 [3, num_tiles]
    segments: torch.Tensor  # int64 [6, S]
    num_tiles: int
    tile: int  # scores per program (BLOCK)
    folded: bool  # no scan launch: every segment has at most FOLD_TILES tiles
    chunk: int  # tiles per iteration of the sum of tile counts (the scan's or the compaction's)
    sparse_keys: int  # candidates of a tile up to which it adds one atomic per key
    sub: int  # keys per step of a tile's histogram (SUB)
    num_warps: int


# On a GPU: about this many programs over all scores (2 per SM of a 132-SM H100/H200), with
# tiles of GPU_MIN_TILE to GPU_MAX_TILE scores (benchmarks/RESULTS.md has the tile sweep).
GPU_PROGRAMS = 256
GPU_MIN_TILE, GPU_MAX_TILE = 1024, 4096
GPU_HISTOGRAM_KEYS_PER_THREAD = 2  # per step of a tile's histogram (see _add_histogram)


def tile_size(sizes: Sequence[int], device: torch.device) -> int:
    """Scores per program: no wider than the longest segment needs. The interpreter pays per
    operation, so on CPU tiles are as wide as allowed (``MAX_TILE``); on a GPU a tile is sized so
    that all scores spread over about ``GPU_PROGRAMS`` programs. On an H100 (benchmarks/RESULTS.md)
    a histogram pass over 98,688 scores in tiles of 4,096 ran on 25 of 132 SMs (21 us a pass);
    tiles of 1,024 took 10 us, and the whole selection was fastest with 1,024 at 98,688 scores
    and with 4,096 at 1,048,576, the two tiles this rule gives."""
    widest = next_power_of_2(max(sizes, default=1))
    if device.type == "cpu":
        return min(MAX_TILE, max(16, widest))
    spread = next_power_of_2(-(-sum(sizes) // GPU_PROGRAMS))
    return min(max(16, widest), GPU_MAX_TILE, max(GPU_MIN_TILE, spread))


def plan(sizes: Sequence[int], ks: Sequence[int], device: torch.device, tile: int | None = None,
         folded: bool | None = None, sparse_keys: int | None = None, sub: int | None = None) -> Plan:
    """Cut each segment into tiles of ``tile`` scores and upload the tables (cached per layout).
    ``folded``: sum the tile counts in the compaction (no scan launch); by default where every
    segment has at most ``FOLD_TILES`` tiles. ``sparse_keys``: by default ``max(ROW_CAP, tile //
    32)``; 0 makes every tile build a histogram. ``sub``: keys per step of a tile's histogram, by
    default ``GPU_HISTOGRAM_KEYS_PER_THREAD`` per thread on a GPU and the whole tile under the
    interpreter (which pays per operation). (The three are there for the tests.)"""
    if tile is None:
        tile = tile_size(sizes, device)
    if not 1 <= tile <= MAX_TILE or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two in [1, {MAX_TILE}], got {tile}")
    tile_segment, tile_start, tile_end = [], [], []
    starts, out_starts, first_tiles, counts = [], [], [], []
    start = out_start = 0
    for s, (size, k) in enumerate(zip(sizes, ks)):
        starts.append(start)
        out_starts.append(out_start)
        first_tiles.append(len(tile_segment))
        for lo in range(start, start + size, tile):
            tile_segment.append(s)
            tile_start.append(lo)
            tile_end.append(min(lo + tile, start + size))
        counts.append(len(tile_segment) - first_tiles[-1])
        start += size
        out_start += k
    num_tiles = len(tile_segment)
    tiles, segments = cached_tables(
        (tuple(tile_segment + tile_start + tile_end),
         tuple(starts) + tuple(sizes) + tuple(ks) + tuple(out_starts) + tuple(first_tiles) + tuple(counts)), device)
    longest = max(counts, default=1)
    if folded is None:
        folded = longest <= FOLD_TILES
    chunk = min(FOLD_CHUNK if folded else 1024, max(16, next_power_of_2(longest)))
    if sparse_keys is None:
        sparse_keys = max(ROW_CAP, tile // 32)
    num_warps = 4 if tile <= 1024 else 8
    if sub is None:
        sub = tile if device.type == "cpu" else min(tile, GPU_HISTOGRAM_KEYS_PER_THREAD * 32 * num_warps)
    if not 1 <= sub <= tile or sub & (sub - 1):
        raise ValueError(f"sub must be a power of two in [1, tile={tile}], got {sub}")
    return Plan(tuple(sizes), tuple(ks), tiles, segments, num_tiles, tile, folded, chunk, sparse_keys, sub, num_warps)


def new_histogram(num_segments: int, device: torch.device) -> torch.Tensor:
    """The selection's zeroed int32 histograms ``[NUM_PASSES, num_segments, BINS]`` (one memset),
    allocated per selection: no state carries over from one call to the next."""
    return torch.zeros(NUM_PASSES * num_segments * BINS, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class FirstPass:
    """A selection's histograms whose first pass the norm pass fills (``block_sqnorms(...,
    first_pass=)``: each block adds its key's first digit to its segment's histogram, segment 0
    or, ``per_tensor``, its tensor's index), then handed to :func:`select_blocks`, which starts
    at the second pass. Only where the selection ranks the norm pass's output unchanged."""

    hist: torch.Tensor
    per_tensor: bool

    @classmethod
    def new(cls, num_segments: int, per_tensor: bool, device: torch.device) -> "FirstPass":
        return cls(new_histogram(num_segments, device), per_tensor)


def launch_select_blocks(scores: torch.Tensor, out: torch.Tensor, plan: Plan, hist: torch.Tensor | None = None) -> None:
    """The selection's fixed launch sequence for a :func:`plan`: a zeroed histogram, three
    histogram passes (the last also counts, per tile, the keys above T's prefix and keeps what
    the counts of its keys > T and == T need), the scan where a segment has more than
    ``FOLD_TILES`` tiles, the compaction. ``hist``: histograms from :func:`new_histogram` whose
    first pass is already done (by the norm pass, see :class:`FirstPass`); the sequence then
    starts at the second pass. Scratch is allocated per call, so no state carries over from one
    call to the next and concurrent calls share nothing."""
    num_segments = len(plan.sizes)
    device = scores.device
    first = 0 if hist is None else 1
    if hist is None:
        hist = new_histogram(num_segments, device)
    # Every entry is written by the last histogram pass or the scan before it is read: no memset.
    scratch = torch.empty((3 + ROW) * plan.num_tiles, dtype=torch.int32, device=device)
    grid = (plan.num_tiles,)
    for p in range(first, NUM_PASSES):
        _histogram_kernel[grid](scores, plan.tiles, plan.segments, hist, scratch, plan.num_tiles, num_segments,
                                plan.sparse_keys, P=p, BLOCK=plan.tile, SUB=plan.sub, BINS=BINS, ROW_CAP=ROW_CAP,
                                num_warps=plan.num_warps)
    if plan.folded:
        bases = scratch  # not read
    else:
        bases = torch.empty(plan.num_tiles + 2 * num_segments, dtype=torch.int64, device=device)
        _scan_kernel[(num_segments,)](plan.segments, hist, scratch, bases, plan.num_tiles, num_segments,
                                      plan.sparse_keys, CHUNK=plan.chunk, BINS=BINS, NUM_PASSES=NUM_PASSES,
                                      ROW_CAP=ROW_CAP, num_warps=4)
    _compact_kernel[grid](scores, plan.tiles, plan.segments, hist, scratch, bases, out, plan.num_tiles,
                          num_segments, plan.sparse_keys, BLOCK=plan.tile, FOLDED=plan.folded, CHUNK=plan.chunk,
                          BINS=BINS, NUM_PASSES=NUM_PASSES, ROW_CAP=ROW_CAP, num_warps=plan.num_warps)


def select_blocks(scores: torch.Tensor, segment_sizes: Sequence[int], segment_ks: Sequence[int],
                  cache: dict | None = None, tile: int | None = None,
                  first_pass: FirstPass | None = None, **forced) -> torch.Tensor:
    """Same contract as :func:`sparse_grad.backends.reference.select_blocks`, on many programs.

    The tables are cached on the device per (sizes, ks), so a step with the same layout and
    density copies nothing to the device; ``cache``, a dict the caller keeps while sizes and ks
    stay the same, saves building their key. ``tile``: scores per program (a power of two, at
    most ``MAX_TILE``; by default :func:`tile_size`). ``first_pass``: the :class:`FirstPass` the
    norm pass that computed ``scores`` filled (one segment per entry of ``segment_sizes``).
    ``forced``: :func:`plan`'s ``folded``, ``sparse_keys`` and ``sub``, for the tests and the
    benchmarks that compare launch sequences (like ``tile``, they bypass ``cache``).
    """
    if scores.numel() > MAX_BLOCKS:
        raise ValueError(f"scores has {scores.numel()} blocks; at most {MAX_BLOCKS} are supported")
    if first_pass is not None and first_pass.hist.numel() != NUM_PASSES * len(segment_sizes) * BINS:
        raise ValueError(f"first_pass holds {first_pass.hist.numel() // (NUM_PASSES * BINS)} segments' histograms, "
                         f"segment_sizes has {len(segment_sizes)}")
    total = sum(segment_ks)
    out = torch.empty(total, dtype=torch.int64, device=scores.device)
    if total == 0:
        return out
    cached = cache is not None and tile is None and not forced
    prepared = cache.get("select_blocks") if cached else None
    if prepared is None:
        prepared = plan(segment_sizes, segment_ks, scores.device, tile, **forced)
        if cached:
            cache["select_blocks"] = prepared
    launch_select_blocks(scores, out, prepared, None if first_pass is None else first_pass.hist)
    return out
