"""PyTorch Lightning with SparseAdamW.

SparseAdamW needs no adapter: return it from ``configure_optimizers``, and Lightning's
checkpoints hold its full state::

    def configure_optimizers(self):
        return sparse_grad.SparseAdamW(sparse_grad.param_groups(self, target_modules=["mlp"]), lr=1e-4)

:class:`SparseGradCallback` logs sparse_grad's figures (gradient Gini and top share, mask churn,
ResourceMeter totals, CPR at each validation; :mod:`sparse_grad.integrations.stats`) to the
Trainer's loggers, and with a :class:`~sparse_grad.cpr.MarginalReturnStopper` stops training when
the marginal return stays low::

    trainer = lightning.Trainer(callbacks=[SparseGradCallback(stopper=MarginalReturnStopper(eta=0.0))])
"""
from __future__ import annotations

import torch

from .stats import TrainingStats

try:
    from lightning.pytorch import Callback
except ImportError:
    raise ImportError('sparse_grad.integrations.lightning needs lightning: pip install "sparse_grad[lightning]"') from None

__all__ = ["SparseGradCallback"]


class SparseGradCallback(Callback):
    """Logs sparse_grad's figures to the Trainer's loggers; may stop training.

    Training figures are sent to the Trainer's loggers every
    ``log_every_n_steps`` optimizer steps (default: the Trainer's); CPR after each validation,
    from ``trainer.callback_metrics[metric]`` as ``EarlyStopping`` reads it. Both also go into
    ``trainer.callback_metrics``. The first optimizer of ``configure_optimizers`` is
    the one observed.

    Args:
        log_every_n_steps: positive int, or None for the Trainer's ``log_every_n_steps``.
        metric: the validation metric of CPR (default ``"val_loss"``, lower is better).
        stats_kwargs: the other arguments of :class:`~sparse_grad.integrations.stats.TrainingStats`.
    """

    def __init__(self, *, log_every_n_steps: int | None = None, metric: str = "val_loss", **stats_kwargs):
        super().__init__()
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool)
                                              or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self.stats = TrainingStats(metric=metric, **stats_kwargs)
        self._logged_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise ValueError("the LightningModule's configure_optimizers returned no optimizer")
        self.stats.begin(pl_module, trainer.optimizers[0])
        self._logged_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        # global_step counts optimizer steps: with gradient accumulation several batches share one
        if step == self._logged_step or step == 0 or step % every:
            return
        self._logged_step = step
        self._send(trainer, self.stats.figures())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.stats.metric)
        if value is None:
            return
        returns, stop = self.stats.evaluated(float(value))
        self._send(trainer, returns)
        if stop:
            trainer.should_stop = True

    @staticmethod
    def _send(trainer, figures: dict[str, float]) -> None:
        # Straight to the loggers: LightningModule.log from a callback would re-send a step's
        # value at later steps, and on_validation_end may not call it at all.
        if not figures:
            return
        for logger in trainer.loggers:  # at the 0-based step index, where Lightning logs the step's own metrics
            logger.log_metrics(figures, step=trainer.global_step - 1)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in figures.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        self.stats.end()
