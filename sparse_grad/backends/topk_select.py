"""Block selection with torch.topk on device: exact, ties to the lower id, no host sync.

Each score becomes a unique int64 key ordered like (score descending, id ascending), so any
top-k of the keys is exactly the reference selection.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

_ID_BITS = 31
_ID_MASK = (1 << _ID_BITS) - 1


def rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys, larger = ranked first: by score (NaN highest), then by lower id."""
    if scores.numel() > _ID_MASK:
        raise ValueError(f"scores has {scores.numel()} blocks; at most {_ID_MASK} are supported")
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties with +0.0
    # IEEE bits -> unsigned 32-bit integers in the same order as the floats.
    ordered = torch.where(bits < 0, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    ordered = torch.where(torch.isnan(scores), 0xFFFFFFFF, ordered)
    ids = torch.arange(scores.numel(), device=scores.device, dtype=torch.int64)
    return (ordered << _ID_BITS) | (_ID_MASK - ids)


def ids_of(keys: torch.Tensor) -> torch.Tensor:
    return _ID_MASK - (keys & _ID_MASK)


def select_blocks(scores: torch.Tensor, segment_sizes: Sequence[int], segment_ks: Sequence[int]) -> torch.Tensor:
    """Same contract as :func:`sparse_grad.backends.reference.select_blocks`, in O(1) launches."""
    device = scores.device
    total = sum(segment_ks)
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if list(segment_ks) == list(segment_sizes):  # every block (compared without a Python call per segment)
        return torch.arange(scores.numel(), dtype=torch.int64, device=device)
    keys = rank_keys(scores)
    if len(segment_sizes) == 1:
        top = torch.topk(keys, total, sorted=False).values
        return torch.sort(ids_of(top)).values
    # Per segment: order all blocks by (segment, rank) and take the first k of each segment.
    segment_of, source = _segment_tables(tuple(segment_sizes), tuple(segment_ks), device)
    by_rank = torch.sort(keys, descending=True).indices
    order = by_rank[torch.sort(segment_of[by_rank], stable=True).indices]
    return torch.sort(order[source]).values


@functools.lru_cache(maxsize=64)
def _segment_tables(segment_sizes: tuple[int, ...], segment_ks: tuple[int, ...],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's segment, and for each output slot its position in the blocks ordered by
    (segment, rank). Built on the host and copied once per layout: a copy at every step would
    wait for the device, and could not be captured in a CUDA graph."""
    sizes = torch.tensor(segment_sizes, dtype=torch.int64)
    ks = torch.tensor(segment_ks, dtype=torch.int64)
    segment_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    out_segment = torch.repeat_interleave(torch.arange(len(ks)), ks)
    slot = torch.arange(out_segment.numel())
    source = (torch.cumsum(sizes, 0) - sizes)[out_segment] + slot - (torch.cumsum(ks, 0) - ks)[out_segment]
    return segment_of.to(device), source.to(device)
