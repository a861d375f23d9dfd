"""How the features match tensors to a model's parameter names: by name from
``named_parameters()``, and by identity for the tensors an optimizer hands over."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

__all__ = ["look_up", "trainable_parameters"]

T = TypeVar("T")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``model.named_parameters()`` that have ``requires_grad``, in order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def look_up(params: Sequence[torch.Tensor], table: Mapping[int, T], where: str, missing: str) -> list[T]:
    """``table[id(p)]`` for every tensor ``p`` of ``params``; the first one not in the table raises
    a ``ValueError`` naming it (``{where}[j]`` and its shape) and saying it is not ``missing``."""
    found = []
    for j, p in enumerate(params):
        if id(p) not in table:
            raise ValueError(f"{where}[{j}] (shape {tuple(p.shape)}) is not {missing}")
        found.append(table[id(p)])
    return found
