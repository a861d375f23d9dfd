"""Hugging Face ``transformers.Trainer`` with SparseAdamW.

::

    from sparse_grad.integrations.hf import SparseGradCallback, optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir="out", learning_rate=1e-4, weight_decay=0.01, num_train_epochs=3)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, density=0.05, block_size=4096))
    SparseGradCallback().add_to(trainer)              # gradient statistics, resources, CPR in the logs
    trainer.train()                                   # checkpoints hold SparseAdamW's full state
    trainer.train(resume_from_checkpoint=True)        # continues bit for bit

Two routes, as the Trainer offers them: :func:`optimizer_cls_and_kwargs` lets the Trainer build
SparseAdamW from the prepared model (the route FSDP and DeepSpeed need);
:func:`create_optimizer_and_scheduler` builds it here for ``optimizers=``, the way
``Trainer.create_optimizer`` builds AdamW: learning rate, betas, epsilon and weight decay from
the ``TrainingArguments``, and no weight decay for biases and normalization weights (two param
groups), with the parameters' names, so that a blueprint (``blueprint=Blueprint.load(...)``)
matches them. This module needs ``transformers`` only for :func:`create_optimizer_and_scheduler`
and :class:`SparseGradCallback`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..optim import SparseAdamW
from ..targeting import decay_parameter_names
from .stats import TrainingStats

__all__ = ["SparseGradCallback", "create_optimizer", "create_optimizer_and_scheduler", "decay_parameter_names",
           "optimizer_cls_and_kwargs"]

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


def optimizer_cls_and_kwargs(args, **sparse_kwargs) -> tuple[type[SparseAdamW], dict]:
    """``(SparseAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the route that
    works under FSDP and DeepSpeed, where the Trainer builds the optimizer from the prepared
    model (and ``optimizers=`` is refused).

    ``kwargs`` holds ``lr``, ``betas`` and ``eps`` from ``args`` (the Trainer passes only what
    this tuple holds: without them SparseAdamW's defaults would apply) and ``sparse_kwargs``.
    The Trainer makes the param groups, with ``args.weight_decay`` and its no-decay rule, as
    plain tensors: a blueprint then needs ``blueprint.bind(model)`` first.
    """
    number = (int, float)
    clash = sorted(set(sparse_kwargs) & set(FROM_ARGS))
    if clash:
        raise ValueError(f"{', '.join(clash)} come from the TrainingArguments (learning_rate, adam_beta1/2, "
                         "adam_epsilon, weight_decay); set them there")
    kwargs = {"lr": _from_args(args, "learning_rate", number),
              "betas": (_from_args(args, "adam_beta1", number), _from_args(args, "adam_beta2", number)),
              "eps": _from_args(args, "adam_epsilon", number), **sparse_kwargs}
    return SparseAdamW, kwargs


def create_optimizer_and_scheduler(model: nn.Module, args, num_training_steps: int | None = None,
                                   **sparse_kwargs) -> tuple[SparseAdamW, torch.optim.lr_scheduler.LRScheduler | None]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: :func:`create_optimizer` and
    the scheduler the Trainer would make (``args.lr_scheduler_type``, warm-up from
    ``args.warmup_steps``/``warmup_ratio``, ``args.lr_scheduler_kwargs``) over
    ``num_training_steps`` (default ``args.max_steps``).

    Epoch-based runs (``args.max_steps`` not set and no ``num_training_steps``): the step count
    depends on the data loader the Trainer builds, so the scheduler is None, and the Trainer
    makes it (the same one, over the right number of steps) when training starts.
    """
    try:
        from transformers import get_scheduler
    except ImportError:
        raise ImportError('create_optimizer_and_scheduler needs transformers: pip install "sparse_grad[hf]"') from None
    if num_training_steps is None:
        num_training_steps = getattr(args, "max_steps", -1)
        if isinstance(num_training_steps, int) and num_training_steps <= 0:
            return create_optimizer(model, args, **sparse_kwargs), None
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError("num_training_steps must be a positive int (or set args.max_steps), "
                         f"got {num_training_steps!r}")
    optimizer = create_optimizer(model, args, **sparse_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(num_training_steps),
                              num_training_steps=num_training_steps,
                              scheduler_specific_kwargs=getattr(args, "lr_scheduler_kwargs", None) or {})
    return optimizer, scheduler


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # the module stays importable for create_optimizer without transformers
    _CallbackBase = object


class SparseGradCallback(_CallbackBase):
    """A ``transformers.TrainerCallback`` that adds sparse_grad's figures to the Trainer's logs:
    gradient Gini and top share, mask churn, ResourceMeter totals and, at each evaluation, CPR
    (:mod:`sparse_grad.integrations.stats` lists them); with a ``stopper``, it stops training
    when the marginal return stays low.

    ::

        callback = SparseGradCallback(stopper=MarginalReturnStopper(window=3, eta=0.0))
        trainer = Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, density=0.05))
        callback.add_to(trainer)          # ahead of the report_to loggers
        trainer.train()

    The figures go into the log entries (``trainer.state.log_history``) and to every callback
    after this one; :meth:`add_to` puts it ahead of the ``report_to`` integrations (TensorBoard,
    W&B, …), which the Trainer places before callbacks given to it, so that they see them too.

    Args are those of :class:`~sparse_grad.integrations.stats.TrainingStats` (``metric``
    defaults to ``"eval_loss"``, lower is better).
    """

    def __init__(self, **stats_kwargs):
        if _CallbackBase is object:
            raise ImportError('SparseGradCallback needs transformers: pip install "sparse_grad[hf]"')
        self.stats = TrainingStats(**stats_kwargs)

    def add_to(self, trainer) -> SparseGradCallback:
        """Add this callback to ``trainer`` ahead of its other callbacks; returns ``self``."""
        handler = getattr(trainer, "callback_handler", None)
        if handler is None or not isinstance(getattr(handler, "callbacks", None), list):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if self not in handler.callbacks:
            handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate wraps the optimizer; the score and step hooks belong on SparseAdamW itself
        self.stats.begin(model, getattr(optimizer, "optimizer", optimizer))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        figures = self.stats.figures()
        value = logs.get(self.stats.metric)
        if value is not None:
            returns, stop = self.stats.evaluated(value)
            figures.update(returns)
            if stop:
                control.should_training_stop = True
        logs.update(figures)
        # The Trainer appended this entry before calling the callbacks.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in figures):
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, **kwargs):
        self.stats.end()
