"""What a step does to the gradients before the update (docs/design.md §3.5, §3.6): GradScaler's
unscaling and skipped steps, clipping, error feedback. All on device, no host sync.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import repeat

import torch

from ..layout import BlockLayout


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
        if grad_scale is None and found_inf is None:
            return _NO_SCALING
        inv = None if grad_scale is None else grad_scale.to(device).double().reciprocal().float().reshape(1)
        found = None if found_inf is None else found_inf.to(device, torch.float32).reshape(1)
        return cls(inv, found, None if found is None else found != 0)


_NO_SCALING = Scaling()


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


def grad_coef(scores: torch.Tensor | None, max_grad_norm: float | None,
              inv_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The one device scalar the update kernel multiplies the grads by: clipping and unscaling."""
    if max_grad_norm is None:
        return inv_scale
    coef = clip_coef(scores, max_grad_norm)
    return coef if inv_scale is None else coef * inv_scale


def add_error(grads: list[torch.Tensor], errors: list[torch.Tensor], scaling: Scaling) -> list[torch.Tensor]:
    """Error feedback, before scoring: the gradient a step sees is ``grad + error`` (the state
    dtype, so 16-bit grads lose no mass; unscaled under AMP). The buffer itself becomes that sum;
    :func:`keep_error` then clears what the update applied. An overflowed step (``scaling.skip``)
    leaves the buffer as it was. Returns the buffers, to be used as the grads."""
    if scaling.inv_scale is None and scaling.skip is None:
        torch._foreach_add_(errors, grads)
        return errors
    for g, error in zip(grads, errors):  # torch has no foreach where: one tensor at a time
        unscaled = g if scaling.inv_scale is None else g * scaling.inv_scale
        summed = error + unscaled
        error.copy_(summed if scaling.skip is None else torch.where(scaling.skip, error, summed))
    return errors


def keep_error(errors: list[torch.Tensor], block_ids: torch.Tensor, layout: BlockLayout,
               skip: torch.Tensor | None = None) -> None:
    """Zero the buffers on the blocks just updated: their gradient was applied (not on a skipped
    step, where nothing was)."""
    applied = torch.zeros(layout.num_blocks, dtype=torch.bool, device=block_ids.device)
    applied = applied.index_fill(0, block_ids, True)
    if skip is not None:
        applied &= ~skip
    block_size = layout.block_size
    mask = applied.repeat_interleave(block_size, output_size=layout.num_blocks * block_size)
    parts = mask.split([n * block_size for n in layout.block_counts])  # each tensor's blocks, padded
    if torch.compiler.is_compiling():  # dynamo traces plain loops, not C-level maps
        for error, part in zip(errors, parts):
            error.masked_fill_(part[:error.numel()].view_as(error), 0.0)
        return
    # Per tensor, through C-level maps (no Python frame per tensor): its elements' mask, then
    # masked_fill_ (not mul: inf·0 is NaN).
    masks = map(torch.Tensor.view_as, map(torch.Tensor.narrow, parts, repeat(0), repeat(0), layout.numels), errors)
    deque(map(torch.Tensor.masked_fill_, errors, masks, repeat(0.0)), maxlen=0)
