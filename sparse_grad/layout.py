"""Global block numbering over a list of tensors (docs/design.md §2).

Every tensor is viewed flat and cut into blocks of ``block_size`` elements; the last block of a
tensor may be partial and blocks never span tensors. Blocks are numbered globally in list order:
tensor ``t`` owns the blocks ``block_offsets[t] .. block_offsets[t + 1] - 1``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from ._checks import block_size as check_block_size

__all__ = ["BlockLayout", "cached_layout", "check_tensor", "num_blocks_of"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def num_blocks_of(numel: int, block_size: int) -> int:
    """Number of blocks of a tensor with ``numel`` elements (the last one may be partial)."""
    return (numel + block_size - 1) // block_size


def check_tensor(t, name: str, device: torch.device | None = None, contiguous: bool = True) -> None:
    """Raise unless ``t`` is a dense, real floating tensor (on ``device`` if given), contiguous
    unless ``contiguous=False`` (then it must not overlap itself: a step writes it back)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor ({t.layout}); sparse_grad needs dense tensors")
    if t.is_complex():
        raise TypeError(f"{name} is complex ({t.dtype}); sparse_grad supports real floating dtypes")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
        )
    if not t.is_contiguous() and (contiguous or torch._debug_has_internal_overlap(t) == 1):
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
                         + ("" if contiguous else " and its elements overlap"))
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the first tensor is on {device}")


class BlockLayout:
    """Global block numbering over ``tensors`` cut into blocks of ``block_size`` elements.

    Attributes:
        block_size: elements per block.
        numels: element count of each tensor.
        block_counts: blocks of each tensor, ``ceil(numel / block_size)``.
        block_offsets: int64 CPU tensor of length ``len(tensors) + 1``; ``block_offsets[t]`` is the
            first global block of tensor ``t`` and ``block_offsets[-1] == num_blocks``.
        num_blocks: total number of blocks.
        device: device of the tensors (``None`` for an empty list).

    Only shapes are kept, not the tensors, so a layout can be reused for any list of tensors with
    the same element counts (grads, moments) — see :meth:`matches`.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], block_size: int, *, name: str = "tensors"):
        block_size = check_block_size(block_size)
        if isinstance(tensors, torch.Tensor):
            raise TypeError(f"{name} must be a list of tensors, not a single tensor")
        tensors = list(tensors)
        device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
        for i, t in enumerate(tensors):
            check_tensor(t, f"{name}[{i}]", device)
        self._build([t.numel() for t in tensors], block_size, device)

    @classmethod
    def of_numels(cls, numels: Sequence[int], block_size: int, device: torch.device | None = None) -> "BlockLayout":
        """The layout of tensors with these element counts, for callers that checked them already."""
        layout = cls.__new__(cls)
        layout._build(numels, check_block_size(block_size), device)
        return layout

    def _build(self, numels: Sequence[int], block_size: int, device: torch.device | None) -> None:
        self.block_size = block_size
        self.device = device
        self.numels = tuple(numels)
        self.block_counts = tuple(num_blocks_of(n, block_size) for n in self.numels)
        offsets = [0]
        for c in self.block_counts:
            offsets.append(offsets[-1] + c)
        self._offsets = tuple(offsets)
        self.block_offsets = torch.tensor(offsets, dtype=torch.int64)
        self.num_blocks = offsets[-1]

    def __len__(self) -> int:
        return len(self.numels)

    def __repr__(self) -> str:
        return (f"BlockLayout(tensors={len(self)}, elements={sum(self.numels)}, "
                f"block_size={self.block_size}, num_blocks={self.num_blocks})")

    def block_range(self, t: int) -> tuple[int, int]:
        """Global ids ``[start, end)`` of the blocks of tensor ``t``."""
        return self._offsets[t], self._offsets[t + 1]

    def block_numels(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Element count of every block (int64 ``[num_blocks]``): ``block_size`` except tails."""
        sizes = torch.full((self.num_blocks,), self.block_size, dtype=torch.int64)
        for t, n in enumerate(self.numels):
            if n % self.block_size:
                sizes[self._offsets[t + 1] - 1] = n % self.block_size
        return sizes.to(device or "cpu")

    def block_to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor index of every block (int32 ``[num_blocks]``)."""
        counts = torch.tensor(self.block_counts, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(self), dtype=torch.int32), counts)
        return owner.to(device or "cpu")

    def tensor_of_block(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Tensor index (int64) of each global block id in ``block_ids``."""
        offsets = self.block_offsets.to(block_ids.device)
        return torch.searchsorted(offsets, block_ids, right=True) - 1

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` have exactly this layout's element counts, in order."""
        return len(tensors) == len(self) and all(t.numel() == n for t, n in zip(tensors, self.numels))


@functools.lru_cache(maxsize=64)
def cached_layout(numels: tuple[int, ...], block_size: int, device: torch.device | None) -> BlockLayout:
    """The layout of tensors with these element counts, built once and shared (treat it as
    read-only): an optimizer step over the same params builds no tensor for it."""
    return BlockLayout.of_numels(numels, block_size, device)
