"""Host-side tables the multi-tensor kernels read: block map, pointer tables, dtype groups."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import triton
import triton.language as tl

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def compute_dtype(dtype: torch.dtype):
    """fp32 math for 16/32-bit tensors, fp64 math for fp64 tensors."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class BlockMap:
    """Where the blocks of a list of tensors live; depends only on shapes, so it is cached."""

    num_blocks: int
    numels: torch.Tensor  # int64 [T]: elements of each tensor
    first_block: torch.Tensor  # int64 [T]: global id of each tensor's first block
    block_tensor: torch.Tensor  # int32 [num_blocks]: owning tensor of each block


@functools.lru_cache(maxsize=32)
def block_map(numels: tuple[int, ...], block_size: int, device: torch.device) -> BlockMap:
    counts = torch.tensor([(n + block_size - 1) // block_size for n in numels], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    return BlockMap(
        num_blocks=int(counts.sum()),
        numels=torch.tensor(numels, dtype=torch.int64).to(device),
        first_block=first.to(device),
        block_tensor=owner.to(device),
    )


def to_device(rows: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 rows on ``device``, moved in one host-to-device copy (pinned, non-blocking)."""
    lengths = [len(r) for r in rows]
    host = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    if device.type != "cpu":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, lengths))


def float64_bits(values: Sequence[float]) -> list[int]:
    """fp64 values as their int64 bit patterns, to travel in an int64 table."""
    return torch.tensor(values, dtype=torch.float64).view(torch.int64).tolist()


def group_by(keys: Sequence[Hashable]) -> tuple[list[int], list[Hashable]]:
    """Group index of each key and the distinct keys in first-seen order (one launch per group)."""
    distinct: dict[Hashable, int] = {}
    index = [distinct.setdefault(k, len(distinct)) for k in keys]
    return index, list(distinct)


def launch_config(block_size: int, device: torch.device, max_chunk: int,
                  chunk: int | None = None, num_warps: int | None = None) -> dict:
    """Elements per loop iteration (CHUNK), iterations per block and warps per program.

    The interpreter (CPU tensors) pays per operation, not per element, so it gets wide chunks.
    """
    if chunk is None:
        chunk = min(triton.next_power_of_2(block_size), (1 << 16) if device.type == "cpu" else max_chunk)
    return dict(CHUNK=chunk, NUM_CHUNKS=triton.cdiv(block_size, chunk),
                num_warps=num_warps or (4 if chunk <= 1024 else 8))
