"""Host-side tables the multi-tensor kernels read: block map, pointer tables, dtype groups."""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
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


def _upload(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """int64 rows, concatenated, on ``device`` in one host-to-device copy (pinned, non-blocking)."""
    host = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    if device.type != "cpu":
        host = host.pin_memory().to(device, non_blocking=True)
    return host


# Device copies of the tables of recent calls, keyed by their contents (pointer values
# included): a step over the same tensors reuses them and copies nothing to the device. A
# re-allocated tensor (zero_grad(set_to_none=True), new params) has another address, hence
# another key; one re-allocated at the same address needs no new table. Least recently used
# entries are dropped past CACHE_SIZE, so tables of tensors freed long ago do not pile up.
CACHE_SIZE = 64
_cache: OrderedDict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()


def _cached(rows: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    key = (device, rows)
    entry = _cache.get(key)
    if entry is None:
        flat = _upload(rows, device)
        entry = _cache[key] = (flat, list(torch.split(flat, [len(r) for r in rows])))
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return entry


def cached_rows(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The int64 ``rows``, concatenated, on ``device`` (cached, see ``CACHE_SIZE``)."""
    return _cached(rows, device)[0]


def cached_tables(rows: tuple[tuple[int, ...], ...], device: torch.device) -> list[torch.Tensor]:
    """One int64 tensor per row on ``device`` (cached, see ``CACHE_SIZE``)."""
    return _cached(rows, device)[1]


def clear_cache() -> None:
    """Drop every cached device table."""
    _cache.clear()


def group_by(keys: Sequence[Hashable]) -> tuple[list[int], list[Hashable]]:
    """Group index of each key and the distinct keys in first-seen order (one launch per group)."""
    distinct: dict[Hashable, int] = {}
    index = [distinct.setdefault(k, len(distinct)) for k in keys]
    return index, list(distinct)


def element_offsets(tensors: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Where each tensor starts, in its elements from the tensor ``bases[i]`` of the same dtype.

    Exact when both start on a multiple of the element size, as torch's own allocations and
    views do; memory from elsewhere (from_blob, DLPack) need not, and is refused rather than
    addressed a fraction of an element off."""
    offsets = []
    for t, b in zip(tensors, bases):
        distance = t.data_ptr() - b.data_ptr()
        if distance % t.element_size():
            raise ValueError(f"a {t.dtype} tensor at address {t.data_ptr():#x} is not aligned to its element size")
        offsets.append(distance // t.element_size())
    return tuple(offsets)


def vector_width(tensors: Sequence[torch.Tensor], block_size: int) -> int:
    """Elements per 16-byte access if every tensor starts on 16 bytes and every block does
    (``block_size`` a multiple of it), else 1: the kernels then tell the compiler so, which
    lets it load 16 bytes at a time. One misaligned view makes the whole launch scalar."""
    vec = 16 // tensors[0].element_size()
    if block_size % vec or any(t.data_ptr() % 16 for t in tensors):
        return 1
    return vec


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1). ``triton.next_power_of_2`` is the same
    number, but from Triton 3.9 a call of it from host code goes through its constexpr-function
    wrapper, several µs a call on a step's host path."""
    return 1 << max(n - 1, 0).bit_length()


def launch_config(block_size: int, device: torch.device, max_chunk: int,
                  chunk: int | None = None, num_warps: int | None = None) -> dict:
    """Elements per loop iteration (CHUNK), iterations per block and warps per program.

    The interpreter (CPU tensors) pays per operation, not per element, so it gets wide chunks.
    """
    if chunk is None:
        chunk = min(next_power_of_2(block_size), (1 << 16) if device.type == "cpu" else max_chunk)
    return dict(CHUNK=chunk, NUM_CHUNKS=-(-block_size // chunk),
                num_warps=num_warps or (4 if chunk <= 1024 else 8))
