"""Hugging Face ``transformers.Trainer`` with SparseAdamW.

::

    from sparse_grad.integrations.hf import create_optimizer, create_optimizer_and_scheduler

    args = TrainingArguments(output_dir="out", learning_rate=1e-4, weight_decay=0.01, max_steps=1000)
    optimizers = create_optimizer_and_scheduler(model, args, density=0.05, block_size=4096)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=optimizers)
    trainer.train()                                   # checkpoints hold SparseAdamW's full state
    trainer.train(resume_from_checkpoint=True)        # continues bit for bit

:func:`create_optimizer` builds SparseAdamW the way ``Trainer.create_optimizer`` builds AdamW:
learning rate, betas, epsilon and weight decay from the ``TrainingArguments``, and no weight
decay for biases and normalization weights (two param groups). Parameters are passed with their
names, so a blueprint (``blueprint=Blueprint.load(...)``) matches them. This module needs
``transformers`` only for :func:`create_optimizer_and_scheduler`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..optim import SparseAdamW
from ..targeting import decay_parameter_names

__all__ = ["create_optimizer", "create_optimizer_and_scheduler", "decay_parameter_names"]

# Set by the TrainingArguments, so not accepted again as keyword arguments.
FROM_ARGS = ("lr", "betas", "eps", "weight_decay")


def _from_args(args, name: str, kind) -> float:
    if not hasattr(args, name):
        raise TypeError(f"args must be transformers.TrainingArguments (or have .{name}); "
                        f"{type(args).__name__} has no {name!r}")
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"args.{name} must be a number, got {type(value).__name__}")
    return float(value)


def create_optimizer(model: nn.Module, args, **sparse_kwargs) -> SparseAdamW:
    """SparseAdamW over ``model``'s trainable parameters, configured from ``args``.

    Args:
        model: the model the Trainer trains.
        args: ``transformers.TrainingArguments``: ``learning_rate``, ``weight_decay``,
            ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon`` are used.
        sparse_kwargs: any other SparseAdamW option (``density``, ``block_size``, ``scope``,
            ``blueprint``, ``state_layout``, …); both param groups get them.

    Biases and normalization weights form a second group with ``weight_decay=0``. Gradient
    clipping stays with the Trainer (``args.max_grad_norm``).
    """
    number = (int, float)
    lr = _from_args(args, "learning_rate", number)
    weight_decay = _from_args(args, "weight_decay", number)
    betas = (_from_args(args, "adam_beta1", number), _from_args(args, "adam_beta2", number))
    eps = _from_args(args, "adam_epsilon", number)
    clash = sorted(set(sparse_kwargs) & set(FROM_ARGS))
    if clash:
        raise ValueError(f"{', '.join(clash)} come from the TrainingArguments (learning_rate, adam_beta1/2, "
                         "adam_epsilon, weight_decay); set them there")
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True")
    groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
    return SparseAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, **sparse_kwargs)


def create_optimizer_and_scheduler(model: nn.Module, args, num_training_steps: int | None = None,
                                   **sparse_kwargs) -> tuple[SparseAdamW, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: :func:`create_optimizer` and
    the scheduler the Trainer would make (``args.lr_scheduler_type``, warm-up from
    ``args.warmup_steps``/``warmup_ratio``, ``args.lr_scheduler_kwargs``) over
    ``num_training_steps`` (default ``args.max_steps``)."""
    try:
        from transformers import get_scheduler
    except ImportError:
        raise ImportError('create_optimizer_and_scheduler needs transformers: pip install "sparse_grad[hf]"') from None
    if num_training_steps is None:
        num_training_steps = getattr(args, "max_steps", -1)
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError("num_training_steps must be a positive int (or set args.max_steps), "
                         f"got {num_training_steps!r}")
    optimizer = create_optimizer(model, args, **sparse_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(num_training_steps),
                              num_training_steps=num_training_steps,
                              scheduler_specific_kwargs=getattr(args, "lr_scheduler_kwargs", None) or {})
    return optimizer, scheduler
