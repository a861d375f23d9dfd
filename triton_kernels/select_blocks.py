"""Top-k block selection on device in one launch: radix threshold select, then compaction.

Every score becomes an unsigned 32-bit rank key, ordered like the scores (NaN above everything,
-0.0 equal to +0.0). One program per segment finds the k-th largest key T in four passes over
its segment, one 8-bit digit per pass (a 256-bin histogram of the keys that share the digits
found so far), and then writes, in id order, the ids with key > T and the lowest-id ties
key == T until exactly k are taken. The ids come out ascending without a sort, the output size
is known on the host (sum of the ks), and nothing is read back: no host sync.

The reference it is tested against is ``sparse_grad.backends.topk_select`` (torch.topk on
unique (score, id) keys).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .tables import cached_rows

# Counts within a segment (keys still to take, ties seen, slots taken) are int32.
MAX_BLOCKS = 2**31 - 1


@triton.jit
def _rank_keys(scores_ptr, offsets, valid):
    """uint32 keys, larger = ranked first; lanes that are not ``valid`` get 0."""
    x = tl.load(scores_ptr + offsets, mask=valid, other=0.0)
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, bits ^ bits, bits)  # -0.0 -> +0.0: zeros tie
    negative = (bits >> 31) == 1
    # IEEE bits -> unsigned integers in the order of the floats: flip negatives, set the sign bit
    # of positives.
    keys = tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # not `~`: the interpreter fails on it
    keys = tl.where(x != x, 0xFFFFFFFF, keys)  # NaN ranks highest
    return tl.where(valid, keys, keys ^ keys)


@triton.jit
def _select_kernel(
    scores_ptr,  # fp32 [num_blocks]
    out_ptr,  # int64 [sum of ks]
    table_ptr,  # int64 [4, S]: first block, blocks, k, first output slot of each segment
    num_segments,
    CHUNK: tl.constexpr,
):
    segment = tl.program_id(0)
    start = tl.load(table_ptr + segment)
    size = tl.load(table_ptr + num_segments + segment)
    k = tl.load(table_ptr + 2 * num_segments + segment)
    out_start = tl.load(table_ptr + 3 * num_segments + segment)
    lanes = tl.arange(0, CHUNK)
    bins = tl.arange(0, 256)

    # Radix select, most significant digit first: after the pass for bits [shift, shift + 8),
    # `prefix` holds the top digits of T and `need` how many keys with that prefix are still to
    # be taken (the keys above the prefix are all taken).
    need = k.to(tl.int32)
    prefix = tl.zeros([], dtype=tl.uint32)
    for p in tl.static_range(4):
        shift = 24 - 8 * p  # p is a compile-time constant, so is shift
        hist = tl.zeros([256], dtype=tl.int32)
        offset = start * 0
        while offset < size:
            index = offset + lanes
            valid = index < size
            keys = _rank_keys(scores_ptr, start + index, valid)
            if p > 0:  # only the keys that share the digits found so far
                valid = valid & ((keys >> (shift + 8)) == prefix)
            digits = ((keys >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digits, 256, mask=valid)
            offset += CHUNK
        # at_least[d]: keys (with the prefix) whose digit is >= d. T's digit is the largest d with
        # at_least[d] >= need; the keys with a larger digit are all taken.
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        digit = tl.max(tl.where(at_least >= need, bins, 0), axis=0)
        need -= tl.sum(tl.where(bins == digit, at_least - hist, 0), axis=0)
        prefix = (prefix << 8) | digit.to(tl.uint32)

    # Compaction in id order: every key > T, and the first `need` keys == T (ties: lower ids).
    threshold = prefix
    taken = need * 0
    ties_seen = need * 0
    offset = start * 0
    end = tl.where(k > 0, size, offset)  # k == 0 takes nothing: skip the pass
    while offset < end:
        index = offset + lanes
        valid = index < size
        keys = _rank_keys(scores_ptr, start + index, valid)
        above = valid & (keys > threshold)
        tie = (valid & (keys == threshold)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
        chosen = (above | ((tie == 1) & (tie_rank < need))).to(tl.int32)
        slot = taken + tl.cumsum(chosen, axis=0) - chosen
        tl.store(out_ptr + out_start + slot, start + index, mask=chosen == 1)
        taken += tl.sum(chosen, axis=0)
        ties_seen += tl.sum(tie, axis=0)
        offset += CHUNK


def launch_select_blocks(scores: torch.Tensor, out: torch.Tensor, table: torch.Tensor,
                         num_segments: int, chunk: int | None = None, num_warps: int | None = None) -> None:
    """One program per segment; ``table`` as :func:`select_blocks` builds it."""
    if chunk is None:
        # The interpreter pays per operation, not per element: wide chunks there.
        chunk = (1 << 16) if scores.device.type == "cpu" else 4096
    _select_kernel[(num_segments,)](scores, out, table, num_segments, CHUNK=chunk,
                                    num_warps=num_warps or 8)


def select_blocks(scores: torch.Tensor, segment_sizes: Sequence[int], segment_ks: Sequence[int],
                  cache: dict | None = None, chunk: int | None = None) -> torch.Tensor:
    """Same contract as :func:`sparse_grad.backends.reference.select_blocks`, in one launch.

    The segment table is cached on the device per (sizes, ks), so a step with the same layout
    and density copies nothing to the device; ``cache``, a dict the caller keeps while sizes and
    ks stay the same, saves building its key.
    """
    if scores.numel() > MAX_BLOCKS:
        raise ValueError(f"scores has {scores.numel()} blocks; at most {MAX_BLOCKS} are supported")
    device = scores.device
    total = sum(segment_ks)
    out = torch.empty(total, dtype=torch.int64, device=device)
    if total == 0:
        return out
    prepared = None if cache is None else cache.get("select_blocks")
    if prepared is None:
        starts, out_starts = [0], [0]
        for size, k in zip(segment_sizes, segment_ks):
            starts.append(starts[-1] + size)
            out_starts.append(out_starts[-1] + k)
        table = cached_rows((tuple(starts[:-1]), tuple(segment_sizes), tuple(segment_ks), tuple(out_starts[:-1])),
                            device)
        interpreted = None  # the interpreter's chunk: no wider than the longest segment needs
        if device.type == "cpu":
            interpreted = min(1 << 16, max(16, triton.next_power_of_2(max(segment_sizes))))
        prepared = (table, interpreted)
        if cache is not None:
            cache["select_blocks"] = prepared
    table, interpreted = prepared
    launch_select_blocks(scores, out, table, len(segment_sizes), chunk or interpreted)
    return out
