"""SparseAdamW's selection and gradient policies (DESIGN §3.2, §3.3, §3.5), on device, no host sync.

Each function takes what it needs from a param group and the group's :class:`BlockLayout`; the
optimizer calls them in DESIGN's order: scores → EMA → (blueprint blend) → selection, and keeps
the error-feedback buffer around the update.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _checks, ops
from .layout import BlockLayout, num_blocks_of

SCORES = ("l2", "rms")
SELECTIONS = ("norm", "random")
STATE_DTYPES = (None, torch.float32)


def check_options(group: dict, name) -> None:
    """The group options of this module; ``name(key)`` spells a key for the message."""
    _checks.choice(group["score"], SCORES, name("score"))
    _checks.choice(group["selection"], SELECTIONS, name("selection"))
    _checks.non_negative_int(group["seed"], name("seed"))
    if group["selection"] == "random" and group["score_ema"] != 0.0:
        raise ValueError(f"{name('score_ema')} is {group['score_ema']}, but selection='random' ranks "
                         "no scores: set score_ema=0")
    _checks.beta(group["score_ema"], name("score_ema"))
    _checks.non_negative_int(group["min_blocks_per_tensor"], name("min_blocks_per_tensor"))
    _checks.flag(group["error_feedback"], name("error_feedback"))
    if group["max_grad_norm"] is not None:
        _checks.positive(group["max_grad_norm"], name("max_grad_norm"))
    if group["state_dtype"] not in STATE_DTYPES:
        raise ValueError(f"{name('state_dtype')} must be None (the param's dtype) or torch.float32, "
                         f"got {group['state_dtype']!r}")


def state_dtype(group: dict, param: torch.Tensor) -> torch.dtype:
    """The dtype of a param's float state (moments, error buffer)."""
    return group["state_dtype"] or param.dtype


def init_dense_state(state: dict, param: torch.Tensor, dtype: torch.dtype, block_size: int,
                     device: torch.device) -> None:
    """A param's dense state on its first step: moments like the param (a DTensor's sharded like
    it) and one int32 step count per block of the full tensor, on ``device``."""
    if "block_step" in state:
        return
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    state["block_step"] = torch.zeros(num_blocks_of(param.numel(), block_size), dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _block_numels(numels: tuple[int, ...], block_size: int, device: torch.device) -> torch.Tensor:
    return BlockLayout.of_numels(numels, block_size).block_numels(device).float()


def scores_of(sqnorms: torch.Tensor, layout: BlockLayout, kind: str) -> torch.Tensor:
    """A block's score: ``"l2"`` its sum of squares (ranks like the L2 norm), ``"rms"`` its mean
    square (ranks like the RMS: a tensor's short last block is not penalized for its size)."""
    if kind == "l2":
        return sqnorms
    return sqnorms / _block_numels(layout.numels, layout.block_size, sqnorms.device)


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
    """Uniform random fp32 block scores for ``selection="random"``: a hash of (seed, group, draw,
    block id) computed on device — no generator state, so a resumed run draws the same blocks,
    and the same ids on every process. 24-bit values: ties (rare) go to the lower id."""
    base = _mix32(_mix32(_mix32(seed & _MASK32) ^ group_index) ^ (draw & _MASK32))
    ids = torch.arange(layout.num_blocks, dtype=torch.int64, device=layout.device)
    return (_mix32((ids * 0x9E3779B9 + base) & _MASK32) >> 8).float()


def update_ema(states: list[dict], scores: torch.Tensor, layout: BlockLayout, beta: float,
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """``s ← β·s + (1 − β)·score`` per block, kept per param in ``state["score_ema"]``.

    A param's first observation initializes its EMA (no bias towards zero). ``skip``: a device
    bool scalar (an overflowed AMP step) that keeps the old values. Returns the group's EMA.
    """
    parts = []
    for t, state in enumerate(states):
        start, end = layout.block_range(t)
        current = scores[start:end]
        old = state.get("score_ema")
        if old is None:
            state["score_ema"] = old = current.clone()
        else:
            new = old * beta + current * (1.0 - beta)
            # In place: a step captured in a CUDA graph must leave its results in the same tensors.
            old.copy_(new if skip is None else torch.where(skip, old, new))
        parts.append(old)
    return torch.cat(parts)


def select(scores: torch.Tensor, layout: BlockLayout, group: dict, backend: str) -> torch.Tensor:
    """The ids to update: ``ceil(density·n)`` of the group (``scope="global"``) or of every tensor
    (``"tensor"``), and at least ``min(min_blocks_per_tensor, its blocks)`` of every tensor.

    Global scope with a minimum: every tensor's own top blocks are guaranteed (scored +inf), then
    ``max(ceil(density·n), Σ minima)`` blocks are taken over the group.
    """
    density, minimum = group["density"], group["min_blocks_per_tensor"]
    if group["scope"] == "tensor":
        ks = [max(ops.num_selected(density, n), min(minimum, n)) for n in layout.block_counts]
        return ops.select_blocks(scores, ks, segments=layout, backend=backend)
    if minimum == 0:
        return ops.select_blocks(scores, density=density, backend=backend)
    minima = [min(minimum, n) for n in layout.block_counts]
    guaranteed = ops.select_blocks(scores, minima, segments=layout, backend=backend)
    boosted = scores.index_fill(0, guaranteed, float("inf"))
    k = max(ops.num_selected(density, layout.num_blocks), sum(minima))
    return ops.select_blocks(boosted, k, backend=backend)


@dataclass
class Scaling:
    """GradScaler's ``grad_scale`` / ``found_inf`` for one device, as the kernels read them.

    ``inv_scale``: fp32 ``[1]``, ``1 / grad_scale`` as GradScaler.unscale_ computes it, or None;
    ``found_inf``: fp32 ``[1]`` or None; ``skip``: bool ``[1]`` (``found_inf != 0``) or None.
    """

    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    skip: torch.Tensor | None = None

    @classmethod
    def of(cls, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
           device: torch.device) -> "Scaling":
        inv = None if grad_scale is None else grad_scale.to(device).double().reciprocal().float().reshape(1)
        found = None if found_inf is None else found_inf.to(device, torch.float32).reshape(1)
        return cls(inv, found, None if found is None else found != 0)


def check_scaling(value, name: str) -> None:
    """GradScaler's attributes: None or a one-element floating tensor."""
    if value is not None and (not isinstance(value, torch.Tensor) or not value.is_floating_point()
                              or value.numel() != 1):
        raise TypeError(f"optimizer.{name} must be None or a one-element float tensor (set by "
                        f"torch.amp.GradScaler), got {type(value).__name__}")


def clip_coef(sqnorms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (‖g‖ + 1e-6))`` as torch.nn.utils.clip_grad_norm_ computes it, from the
    norm pass's block sums of squares (fp32 ``[1]``, on device)."""
    total = sqnorms.sum().sqrt()
    return (max_norm / (total + 1e-6)).clamp(max=1.0).reshape(1)


def add_error(grads: list[torch.Tensor], states: list[dict], dtypes: list[torch.dtype],
              scaling: Scaling) -> list[torch.Tensor]:
    """Error feedback, before scoring: the gradient a step sees is ``grad + error`` (the state
    dtype, so 16-bit grads lose no mass; unscaled under AMP). The buffer itself becomes that sum;
    :func:`keep_error` then clears what the update applied. An overflowed step (``scaling.skip``)
    leaves the buffer as it was. Returns the buffers, to be used as the grads."""
    out = []
    for g, state, dtype in zip(grads, states, dtypes):
        if "error" not in state:
            state["error"] = torch.zeros(g.shape, dtype=dtype, device=g.device)
        error = state["error"]
        if scaling.inv_scale is None and scaling.skip is None:
            error.add_(g)
        else:
            unscaled = g if scaling.inv_scale is None else g * scaling.inv_scale
            summed = error + unscaled
            error.copy_(summed if scaling.skip is None else torch.where(scaling.skip, error, summed))
        out.append(error)
    return out


def keep_error(errors: list[torch.Tensor], block_ids: torch.Tensor, layout: BlockLayout,
               skip: torch.Tensor | None = None) -> None:
    """Zero the buffers on the blocks just updated: their gradient was applied (not on a skipped
    step, where nothing was)."""
    applied = torch.zeros(layout.num_blocks, dtype=torch.bool, device=block_ids.device)
    applied = applied.index_fill(0, block_ids, True)
    if skip is not None:
        applied &= ~skip
    block_size = layout.block_size
    for t, error in enumerate(errors):
        start, end = layout.block_range(t)
        mask = applied[start:end].repeat_interleave(block_size, output_size=(end - start) * block_size)
        error.masked_fill_(mask[:error.numel()].view_as(error), 0.0)  # not mul: inf·0 is NaN
