"""A plain training loop over the demo data, for the CLI and tests."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .data import batches
from .model import lm_loss

__all__ = ["train_steps"]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, *, steps: int,
                batch: int, context: int, seed: int = 1, device: str | torch.device = "cpu",
                after_backward: Callable[[], None] | None = None) -> list[float]:
    """``steps`` optimizer steps of next-byte prediction on random windows of ``data``;
    ``after_backward()`` runs between ``backward()`` and ``step()`` (e.g. a monitor's
    ``update``). Returns the training losses."""
    losses = []
    for x, y in batches(data, steps, batch, context, seed=seed):
        loss = lm_loss(model, x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
