"""The draws of ``selection="random"`` (docs/design.md §3.2): a stateless hash on device.

No generator state: draw ``r`` of group ``i`` hashes (seed, i, r, block id), so a resumed run
draws the same blocks, and every process of a distributed run draws the same ids.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32) of ints or int64 tensors holding 32-bit
    values; int64 products wrap, and the mask keeps their exact low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def random_scores(layout: BlockLayout, seed: int, group_index: int, draw: int) -> torch.Tensor:
    """Uniform random fp32 block scores: 24-bit values, so ties (rare) go to the lower id."""
    base = _mix32(_mix32(_mix32(seed & _MASK32) ^ group_index) ^ (draw & _MASK32))
    ids = torch.arange(layout.num_blocks, dtype=torch.int64, device=layout.device)
    return (_mix32((ids * 0x9E3779B9 + base) & _MASK32) >> 8).float()
