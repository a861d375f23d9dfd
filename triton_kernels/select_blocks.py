"""Exact top-k block selection on many programs: a three-pass radix select, then an ordered compaction.

Every score becomes an unsigned 32-bit rank key, ordered like the scores (NaN above everything,
-0.0 equal to +0.0). Each segment's k-th largest key T is found one digit at a time, most
significant first (11, 11 and 10 bits): every tile of at most ``MAX_TILE`` scores histograms the
digit of its keys that share the digits found so far, into its segment's histogram in global
memory (integer atomics: the sums, hence T, are deterministic). Nothing is read back between
passes: each program of the next kernel re-derives the digits found so far from the finished
histograms (a cumulative sum over 2,048 bins, cheaper than a launch of its own). The last pass
also stores, per tile, its keys above T's 22-bit prefix and the suffix sums of its last-digit
histogram, from which one program per segment, knowing T, reads each tile's keys > T and == T
(two entries per tile) and scans them (exclusive, in tile order); then every tile writes its chosen ids to their final slots: all keys > T and the ties
== T of lowest id until exactly k are taken. The ids come out ascending without a sort, the
output size is known on the host (the sum of the ks), and no program reads more than
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

from .tables import cached_tables

# Counts within a segment (keys still to take, ties seen, slots taken) are int32.
MAX_BLOCKS = 2**31 - 1
# No program reads more scores than this: a large vector is spread over many programs.
MAX_TILE = 8192
# Histogram bins per pass: digits of 11, 11 and 10 bits cover the 32-bit key in three passes.
BINS = 2048
NUM_PASSES = 3


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
    """This program's tile: its segment, its k, its ids and which lanes hold one."""
    tile = tl.program_id(0).to(tl.int64)
    segment = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    k = tl.load(segments_ptr + 2 * num_segments + segment)
    index = start + tl.arange(0, BLOCK)
    return tile, segment, k, index, index < end


@triton.jit
def _histogram_kernel(
    scores_ptr,  # fp32 [num_blocks]
    tiles_ptr,  # int64 [3, num_tiles]: segment, first id, end id of each tile
    segments_ptr,  # int64 [6, S]: first block, blocks, k, first output slot, first tile, tiles
    hist_ptr,  # int32 [NUM_PASSES, S, BINS], zero before the first pass
    above_ptr,  # int32 [num_tiles]: keys above the prefix of T (written by the last pass)
    suffix_ptr,  # int32 [num_tiles, BINS // 2]: keys with T's prefix and a last digit >= d (last pass)
    num_tiles,
    num_segments,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,
):
    tile, segment, k, index, valid = _tile(tiles_ptr, segments_ptr, num_tiles, num_segments, BLOCK)
    keys = _rank_keys(scores_ptr, index, valid)
    if P > 0:  # only the keys that share the digits found so far
        prefix, need = _threshold(hist_ptr, segment, num_segments, k, P, BINS)
        if P == 2:  # the last pass
            # Every key above T's prefix is above T, whatever T's last digit turns out to be.
            tl.store(above_ptr + tile, tl.sum((valid & (_prefix(keys, P) > prefix)).to(tl.int32), axis=0))
        valid = valid & (_prefix(keys, P) == prefix)
    local = tl.histogram(_digit(keys, P), BINS, mask=valid)
    bins = tl.arange(0, BINS)
    # One atomic per non-empty bin of the tile, not per key.
    tl.atomic_add(hist_ptr + (P * num_segments + segment) * BINS + bins, local, mask=local > 0, sem="relaxed")
    if P == 2:
        # The scan, which knows T's last digit t once this pass is complete everywhere, reads the
        # tile's keys > T (above + suffix[t + 1]) and == T (suffix[t] - suffix[t + 1]) from here:
        # no kernel of its own re-reads the scores to count them.
        at_least = tl.sum(local, axis=0) - tl.cumsum(local, axis=0) + local
        tl.store(suffix_ptr + tile * (BINS // 2) + bins, at_least, mask=bins < BINS // 2)


@triton.jit
def _scan_kernel(
    segments_ptr, hist_ptr, above_ptr, suffix_ptr,
    bases_ptr,  # int64 [num_tiles + 2 S]: first output slot of each tile, then T and need per segment
    ties_before_ptr,  # int32 [num_tiles]: keys == T in the segment's earlier tiles
    num_tiles, num_segments,
    CHUNK: tl.constexpr, BINS: tl.constexpr, NUM_PASSES: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    k = tl.load(segments_ptr + 2 * num_segments + segment)
    out_start = tl.load(segments_ptr + 3 * num_segments + segment)
    first_tile = tl.load(segments_ptr + 4 * num_segments + segment)
    tiles = tl.load(segments_ptr + 5 * num_segments + segment)
    threshold, need = _threshold(hist_ptr, segment, num_segments, k, NUM_PASSES, BINS)
    # T's last digit: the tile's keys > T are those above its prefix and those with the prefix and
    # a larger digit. t == BINS // 2 - 1 (the largest, as with k == 0) has no larger digit.
    digit = _digit(threshold, NUM_PASSES - 1).to(tl.int64)
    lanes = tl.arange(0, CHUNK)
    above_carry = need * 0
    ties_carry = need * 0
    offset = tiles * 0
    while offset < tiles:
        index = first_tile + offset + lanes
        valid = offset + lanes < tiles
        row = suffix_ptr + index * (BINS // 2)
        larger = tl.load(row + digit + 1, mask=valid & (digit + 1 + lanes * 0 < BINS // 2), other=0)
        above = tl.load(above_ptr + index, mask=valid, other=0) + larger
        ties = tl.load(row + digit, mask=valid, other=0) - larger
        above_before = above_carry + tl.cumsum(above, axis=0) - above
        ties_before = ties_carry + tl.cumsum(ties, axis=0) - ties
        # Every key > T of an earlier tile is taken, and the earlier ties up to `need`.
        base = out_start + above_before.to(tl.int64) + tl.minimum(ties_before, need).to(tl.int64)
        tl.store(bases_ptr + index, base, mask=valid)
        tl.store(ties_before_ptr + index, ties_before, mask=valid)
        above_carry += tl.sum(above, axis=0)
        ties_carry += tl.sum(ties, axis=0)
        offset += CHUNK
    tl.store(bases_ptr + num_tiles + segment, threshold.to(tl.int64))
    tl.store(bases_ptr + num_tiles + num_segments + segment, need.to(tl.int64))


@triton.jit
def _compact_kernel(
    scores_ptr, tiles_ptr, segments_ptr, bases_ptr, ties_before_ptr,
    out_ptr,  # int64 [sum of ks]
    num_tiles, num_segments,
    BLOCK: tl.constexpr,
):
    tile, segment, k, index, valid = _tile(tiles_ptr, segments_ptr, num_tiles, num_segments, BLOCK)
    threshold = tl.load(bases_ptr + num_tiles + segment).to(tl.uint32)
    need = tl.load(bases_ptr + num_tiles + num_segments + segment).to(tl.int32)
    base = tl.load(bases_ptr + tile)
    ties_before = tl.load(ties_before_ptr + tile)
    keys = _rank_keys(scores_ptr, index, valid)
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
    scan_chunk: int  # tiles per iteration of the scan
    num_warps: int


# On a GPU: about this many programs over all scores (2 per SM of a 132-SM H100/H200), with
# tiles of GPU_MIN_TILE to GPU_MAX_TILE scores (benchmarks/RESULTS.md has the tile sweep).
GPU_PROGRAMS = 256
GPU_MIN_TILE, GPU_MAX_TILE = 1024, 4096


def tile_size(sizes: Sequence[int], device: torch.device) -> int:
    """Scores per program: no wider than the longest segment needs. The interpreter pays per
    operation, so on CPU tiles are as wide as allowed (``MAX_TILE``); on a GPU a tile is sized so
    that all scores spread over about ``GPU_PROGRAMS`` programs. On an H100 (benchmarks/RESULTS.md)
    a histogram pass over 98,688 scores in tiles of 4,096 ran on 25 of 132 SMs (21 us a pass);
    tiles of 1,024 took 10 us, and the whole selection was fastest with 1,024 at 98,688 scores
    and with 4,096 at 1,048,576, the two tiles this rule gives."""
    widest = triton.next_power_of_2(max(sizes, default=1))
    if device.type == "cpu":
        return min(MAX_TILE, max(16, widest))
    spread = triton.next_power_of_2(-(-sum(sizes) // GPU_PROGRAMS))
    return min(max(16, widest), GPU_MAX_TILE, max(GPU_MIN_TILE, spread))


def plan(sizes: Sequence[int], ks: Sequence[int], device: torch.device, tile: int | None = None) -> Plan:
    """Cut each segment into tiles of ``tile`` scores and upload the tables (cached per layout)."""
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
    scan_chunk = min(1024, max(16, triton.next_power_of_2(max(counts, default=1))))
    return Plan(tuple(sizes), tuple(ks), tiles, segments, num_tiles, tile, scan_chunk,
                num_warps=4 if tile <= 1024 else 8)


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
    histogram passes (the last also counts, per tile, the keys above T's prefix and the suffix
    sums of its last digit), the scan, the compaction. ``hist``: histograms from
    :func:`new_histogram` whose first pass is already done (by the norm pass, see
    :class:`FirstPass`); the sequence then starts at the second pass. Scratch is allocated per
    call, so no state carries over from one call to the next and concurrent calls share nothing."""
    num_segments = len(plan.sizes)
    device = scores.device
    first = 0 if hist is None else 1
    if hist is None:
        hist = new_histogram(num_segments, device)
    # Every entry is written by the last histogram pass or the scan before it is read: no memset.
    counts = torch.empty(2 * plan.num_tiles, dtype=torch.int32, device=device)  # above the prefix, ties before
    suffix = torch.empty(plan.num_tiles * (BINS // 2), dtype=torch.int32, device=device)
    bases = torch.empty(plan.num_tiles + 2 * num_segments, dtype=torch.int64, device=device)
    above, ties_before = counts[:plan.num_tiles], counts[plan.num_tiles:]
    grid = (plan.num_tiles,)
    for p in range(first, NUM_PASSES):
        _histogram_kernel[grid](scores, plan.tiles, plan.segments, hist, above, suffix, plan.num_tiles,
                                num_segments, P=p, BLOCK=plan.tile, BINS=BINS, num_warps=plan.num_warps)
    _scan_kernel[(num_segments,)](plan.segments, hist, above, suffix, bases, ties_before, plan.num_tiles,
                                  num_segments, CHUNK=plan.scan_chunk, BINS=BINS, NUM_PASSES=NUM_PASSES,
                                  num_warps=4)
    _compact_kernel[grid](scores, plan.tiles, plan.segments, bases, ties_before, out, plan.num_tiles,
                          num_segments, BLOCK=plan.tile, num_warps=plan.num_warps)


def select_blocks(scores: torch.Tensor, segment_sizes: Sequence[int], segment_ks: Sequence[int],
                  cache: dict | None = None, tile: int | None = None,
                  first_pass: FirstPass | None = None) -> torch.Tensor:
    """Same contract as :func:`sparse_grad.backends.reference.select_blocks`, on many programs.

    The tables are cached on the device per (sizes, ks), so a step with the same layout and
    density copies nothing to the device; ``cache``, a dict the caller keeps while sizes and ks
    stay the same, saves building their key. ``tile``: scores per program (a power of two, at
    most ``MAX_TILE``; by default :func:`tile_size`). ``first_pass``: the :class:`FirstPass` the
    norm pass that computed ``scores`` filled (one segment per entry of ``segment_sizes``).
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
    prepared = None if cache is None or tile is not None else cache.get("select_blocks")
    if prepared is None:
        prepared = plan(segment_sizes, segment_ks, scores.device, tile)
        if cache is not None and tile is None:
            cache["select_blocks"] = prepared
    launch_select_blocks(scores, out, prepared, None if first_pass is None else first_pass.hist)
    return out
