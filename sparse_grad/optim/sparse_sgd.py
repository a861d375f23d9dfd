"""SparseSGD and SparseLion: the sparse optimizer with SGD's and Lion's update (docs/design.md §3.7).

Each is a :class:`~.sparse_adamw.SparseOptimizer` with its own update rule (:mod:`.rules`) and
options; selection, state layouts, AMP, clipping, error feedback and checkpoints are the ones
SparseAdamW documents.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .options import sparsity_options
from .rules import LION, SGD
from .sparse_adamw import SparseOptimizer

__all__ = ["SparseLion", "SparseSGD"]


class SparseSGD(SparseOptimizer):
    r"""SGD on the blocks with the largest gradients; at ``density=1.0`` it is ``torch.optim.SGD``.

    Blocks are scored and selected as in :class:`SparseAdamW` (same options, same meaning).
    For every selected block, with its own step count ``s`` (``s = 1`` on the block's first
    update, which is torch's "no momentum buffer yet")::

        g   = c · grad;  g = −g if maximize         (c: clip coefficient / loss scale)
        g   = g + weight_decay · θ                  (coupled decay, as torch.optim.SGD)
        buf = g if s = 1 else momentum · buf + (1 − dampening) · g      (momentum > 0)
        g   = g + momentum · buf if nesterov else buf                    (momentum > 0)
        θ   = θ − lr · g

    Blocks not selected keep their parameters and buffers bit for bit; a block that was idle
    keeps its old buffer (SGD has no bias correction to catch up with). State per parameter:
    ``momentum_buffer`` (like the parameter, only with ``momentum > 0``, as torch) and
    ``block_step`` (int32 per block). ``momentum`` is a number and shapes the state (buffers
    or none); set above 0 mid-run, the buffers start at zero. ``lr``, ``weight_decay`` may be
    one-element tensors. ``foreach``, ``fused``, ``differentiable`` are accepted as in
    torch.optim.SGD (``differentiable=True`` is refused).
    """

    _rule = SGD

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        density: float = 0.05,
        block_size: int = 4096,
        scope: str = "global",
        reselect_every: int = 1,
        backend: str = "auto",
        blueprint: Any = None,
        blueprint_weight: float | None = None,
        state_dtype: torch.dtype | None = None,
        score: str = "l2",
        score_ema: float = 0.0,
        min_blocks_per_tensor: int = 0,
        error_feedback: bool = False,
        max_grad_norm: float | None = None,
        state_layout: str = "dense",
        selection: str = "norm",
        seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov, "maximize": maximize,
                    **sparsity_options(density, block_size, scope, reselect_every, backend, blueprint,
                                        blueprint_weight, state_dtype, score, score_ema, min_blocks_per_tensor,
                                        error_feedback, max_grad_norm, state_layout, selection, seed),
                    "foreach": foreach, "fused": fused, "differentiable": differentiable}
        super().__init__(params, defaults, blueprint)


class SparseLion(SparseOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") on the blocks
    with the largest gradients.

    Blocks are scored and selected as in :class:`SparseAdamW` (same options, same meaning).
    For every selected block, as lucidrains' lion-pytorch computes it::

        g = c · grad;  g = −g if maximize           (c: clip coefficient / loss scale)
        θ = θ · (1 − lr · weight_decay)             (decoupled decay)
        θ = θ − lr · sign(β₁ · m + (1 − β₁) · g)
        m = β₂ · m + (1 − β₂) · g

    Defaults as the paper recommends and lion-pytorch has them: ``lr=1e-4``, ``betas=(0.9,
    0.99)``, ``weight_decay=0`` (Lion's lr is typically 3–10× smaller than AdamW's, its weight
    decay that much larger). State per parameter: ``exp_avg`` and ``block_step`` (a count per
    block; Lion has no bias correction). ``lr``, ``betas`` and ``weight_decay`` may be
    one-element tensors.
    """

    _rule = LION

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        density: float = 0.05,
        block_size: int = 4096,
        scope: str = "global",
        reselect_every: int = 1,
        backend: str = "auto",
        blueprint: Any = None,
        blueprint_weight: float | None = None,
        state_dtype: torch.dtype | None = None,
        score: str = "l2",
        score_ema: float = 0.0,
        min_blocks_per_tensor: int = 0,
        error_feedback: bool = False,
        max_grad_norm: float | None = None,
        state_layout: str = "dense",
        selection: str = "norm",
        seed: int = 0,
    ):
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize,
                    **sparsity_options(density, block_size, scope, reselect_every, backend, blueprint,
                                        blueprint_weight, state_dtype, score, score_ema, min_blocks_per_tensor,
                                        error_feedback, max_grad_norm, state_layout, selection, seed)}
        super().__init__(params, defaults, blueprint)
