"""Training-framework integrations.

- :mod:`sparse_grad.integrations.hf`: for ``transformers.Trainer``: ``optimizer_cls_and_kwargs``
  (the route that works under FSDP and DeepSpeed), ``create_optimizer`` and
  ``create_optimizer_and_scheduler`` (for ``optimizers=``), and ``SparseGradCallback``
  (extra ``hf``).
- :mod:`sparse_grad.integrations.lightning`: ``SparseGradCallback`` for Lightning; the optimizer
  needs no adapter: return ``SparseAdamW(...)`` from ``configure_optimizers``, and Lightning's
  checkpoints hold its full state (extra ``lightning``).
- :mod:`sparse_grad.integrations.stats`: what both callbacks log (gradient statistics, mask
  churn, resources, CPR).
"""
