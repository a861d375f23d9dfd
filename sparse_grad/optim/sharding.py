"""SparseAdamW on parameters sharded by FSDP2 (``fully_shard``: DTensors, ``Shard(0)`` on a 1-D mesh).

Blocks stay defined in each *full* tensor's flat coordinates, so the selection does not depend on
the world size. A rank's local shard of a tensor is a contiguous range ``[a, a + n)`` of the full
tensor's flat elements (torch.chunk rows: the last ranks may hold fewer rows, or none). The range
is cut at the global block boundaries into at most two *pieces*, both views of the local tensor:

    head  elements [a, min(a + n, next boundary))   the tail of a global block split with the rank before
    body  the rest, starting on a block boundary     its last block may be partial (a tensor end or
                                                     a block split with the rank after)

Every kernel already handles a tensor whose last block is partial, so the unchanged kernels of
every backend (reference, triton, cpp, cuda) run on the pieces; each local piece block maps to
exactly one global block. A step (the functional step of :mod:`.functional`, through this view;
docs/design.md §8):

1. norm pass over the grads' pieces → partial scores, scattered into the group's global score
   vector (zeros elsewhere); one ``all_reduce`` (sum) on the mesh's process group makes it equal
   on every rank (4 bytes per block; the clipping norm is its sum, no second reduce);
2. selection on the global vector exactly as on one process (EMA, blueprint, random draws and
   minima included) → the same global ids on every rank;
3. the global ids → this rank's piece-block ids (one host sync per reselection, to size them);
4. the update kernel on the pieces. Dense state: moments are DTensors like the params; the
   per-block step counts are kept replicated (one count per global block on every rank), so a
   checkpoint can be resharded; compact state: slot table and slabs over this rank's piece
   blocks only (a split block has a slot on both ranks, each holding its part).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..layout import BlockLayout, num_blocks_of
from ..ops import unchecked

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed
    DTensor, Shard = None, None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_range(p, name: str) -> tuple[int, int]:
    """``(a, n)``: the local shard of DTensor ``p`` covers flat elements ``[a, a + n)`` of the full
    tensor. Raises ValueError for any sharding other than FSDP2's ``Shard(0)`` on a 1-D mesh."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {mesh.ndim}-D device mesh; SparseAdamW supports "
                         "FSDP2's 1-D Shard(0) sharding only (no tensor parallel / HSDP meshes)")
    if len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(f"{name} is a DTensor with placements {placements}; SparseAdamW supports "
                         "FSDP2's Shard(0) only (not Shard(d>0), Replicate, Partial or strided shards)")
    local = p.to_local()
    if not local.is_contiguous():
        raise ValueError(f"{name}'s local shard is not contiguous")
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = p.shape[0]
    row_numel = p.numel() // rows if rows else 0
    chunk = -(-rows // world)
    first = min(rank * chunk, rows)
    count = max(0, min(chunk, rows - first))
    if local.numel() != count * row_numel:
        raise ValueError(f"{name}'s local shard has {local.numel()} elements, but torch.chunk-style "
                         f"Shard(0) of {tuple(p.shape)} over {world} ranks gives rank {rank} {count} rows")
    return first * row_numel, count * row_numel


@dataclass(frozen=True)
class _Piece:
    tensor: int  # index in the tensor list the pieces are cut from
    start: int  # first local flat element
    length: int
    first_block: int  # the piece's first block, counted within its full tensor


class ShardedGroup:
    """A param group's local pieces and how their blocks map to the group's global blocks: the
    group view (see :mod:`.group_view`) of FSDP2-sharded params."""

    sharded = True

    def __init__(self, numels: tuple[int, ...], ranges: tuple[tuple[int, int], ...], block_size: int,
                 device: torch.device, process_group):
        self.global_layout = BlockLayout.of_numels(numels, block_size, device)
        self.layout = self.global_layout  # the selection's blocks (full tensors)
        self.device = device
        self.process_group = process_group
        pieces, global_ids = [], []
        for t, (a, n) in enumerate(ranges):
            head = min(n, (-a) % block_size)
            for start, length in ((0, head), (head, n - head)):
                if length == 0:
                    continue
                first = (a + start) // block_size
                pieces.append(_Piece(t, start, length, first))
                offset = self.global_layout.block_range(t)[0]
                global_ids.extend(range(offset + first, offset + first + num_blocks_of(length, block_size)))
        self.pieces_of = tuple(pieces)
        self.kernel_layout = BlockLayout.of_numels([q.length for q in pieces], block_size, device)
        self.compact_numels = list(self.kernel_layout.numels)
        self.piece_global = torch.tensor(global_ids, dtype=torch.int64, device=device)
        self.local_of_global = torch.full((self.global_layout.num_blocks,), -1, dtype=torch.int64, device=device)
        self.local_of_global[self.piece_global] = torch.arange(len(global_ids), dtype=torch.int64, device=device)
        self.touched = self.local_of_global >= 0

    def local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards of DTensors (plain tensors as they are)."""
        return [t.to_local() if is_dtensor(t) else t for t in tensors]

    def kernel_tensors(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.pieces(local)

    def has_work(self) -> bool:
        return bool(self.pieces_of)

    def kernel_ids(self, block_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """:meth:`local_ids`, computed once per selection (the sync happens at a reselection only)."""
        hit = cache.get("kernel_ids")
        if hit is None or hit[0] is not block_ids:
            hit = cache["kernel_ids"] = (block_ids, self.local_ids(block_ids))
        return hit[1]

    def compact_ids(self, group_ids: torch.Tensor) -> torch.Tensor:
        return self.local_ids(group_ids)

    def block_steps(self, per_param: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.block_pieces(per_param)

    def pieces(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of local tensors shaped like the local shards (views)."""
        flats = [t.view(-1) for t in tensors]
        return [flats[q.tensor][q.start:q.start + q.length] for q in self.pieces_of]

    def block_pieces(self, per_block: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces' entries of per-tensor, per-global-block tensors (replicated step counts)."""
        return [per_block[q.tensor][q.first_block:q.first_block + num_blocks_of(q.length, self.kernel_layout.block_size)]
                for q in self.pieces_of]

    def block_sqnorms(self, grads: list[torch.Tensor], backend: str, cache: dict | None = None,
                      first_pass=None) -> torch.Tensor:
        """The group's global block sums of squares, equal on every rank: local partial sums,
        scattered into the global vector and summed over the ranks (one all_reduce)."""
        if first_pass is not None:
            raise ValueError("first_pass: a sharded group's scores are summed over the ranks after the norm "
                             "pass, so its selection runs its own first pass")
        scores = torch.zeros(self.global_layout.num_blocks, dtype=torch.float32, device=self.piece_global.device)
        if self.pieces_of:
            partial = unchecked.block_sqnorms(self.pieces(grads), self.kernel_layout.block_size, backend)
            scores.index_add_(0, self.piece_global, partial)
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=self.process_group)
        return scores

    def local_ids(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Ascending global ids → ascending ids of this rank's piece blocks among them (syncs once
        to learn how many)."""
        local = self.local_of_global[global_ids]
        return local[local >= 0]

    def count_remote_steps(self, block_steps: list[torch.Tensor], global_ids: torch.Tensor,
                           skip: torch.Tensor | None) -> None:
        """Advance the replicated counts of the selected blocks this rank holds no part of (the
        update kernel counted the others), so every rank keeps every count."""
        inc = torch.zeros(self.global_layout.num_blocks, dtype=torch.int32, device=global_ids.device)
        inc.index_fill_(0, global_ids, 1).masked_fill_(self.touched, 0)
        if skip is not None:
            inc.masked_fill_(skip, 0)
        torch._foreach_add_(block_steps, list(inc.split(self.global_layout.block_counts)))


@functools.lru_cache(maxsize=64)
def cached(numels, ranges, block_size, device, process_group) -> ShardedGroup:
    return ShardedGroup(numels, ranges, block_size, device, process_group)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def of_params(params: list, where: str, positions: list[int], block_size: int) -> ShardedGroup | None:
    """The sharded view of a group's params (``group["params"][j]`` for ``j`` in ``positions``),
    or None if none is a DTensor. Raises ValueError for a mix of DTensors and plain tensors,
    several meshes, an unsupported placement, or FSDP1's flat params."""
    if torch.compiler.is_compiling():  # dynamo traces isinstance and getattr, not __dict__
        if any(is_dtensor(p) or getattr(p, "_is_flat_param", False) for p in params):
            raise ValueError(f"{where} holds sharded params (DTensor or FSDP1 FlatParameter): a compiled "
                             "SparseAdamW.step supports plain tensors only; step it eagerly")
        return None
    # The common case, checked every step: keep it cheap. FSDP1's FlatParameter is a Parameter
    # marked by an instance attribute.
    if all(type(p) in _PLAIN and "_is_flat_param" not in p.__dict__ for p in params):
        return None
    names = [f"{where}['params'][{j}]" for j in positions]
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        for p, name in zip(params, names):
            if getattr(p, "_is_flat_param", False):  # its blocks would be per rank: wrong selections
                raise ValueError(f"{name} is an FSDP1 FlatParameter (a rank's flat shard of several params); "
                                 "SparseAdamW supports FSDP2 (torch.distributed.fsdp.fully_shard) and DDP")
        return None
    if not all(sharded):
        plain = names[sharded.index(False)]
        raise ValueError(f"{plain} is a plain tensor in a param group of DTensors; put sharded and "
                         "unsharded params in separate param groups")
    mesh = params[0].device_mesh
    for p, name in zip(params, names):
        if p.device_mesh != mesh:
            raise ValueError(f"{name} lives on another device mesh than {names[0]}; one mesh per param group")
    ranges = tuple(local_range(p, name) for p, name in zip(params, names))
    device = params[0].to_local().device
    return cached(tuple(p.numel() for p in params), ranges, block_size, device, mesh.get_group())


def whole_group(params: list, block_size: int, where: str) -> ShardedGroup | None:
    """The sharded view of all of a group's params (compact state counts blocks over all)."""
    return of_params(params, where, list(range(len(params))), block_size)
