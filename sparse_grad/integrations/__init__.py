"""Training-framework integrations.

- :mod:`sparse_grad.integrations.hf`: ``create_optimizer(model, args, **sparse_kwargs)`` and
  ``create_optimizer_and_scheduler`` for ``transformers.Trainer(optimizers=...)`` (extra ``hf``).
- PyTorch Lightning needs no adapter: return ``SparseAdamW(self.named_parameters(), ...)`` from
  ``configure_optimizers``; Lightning's checkpoints hold its full state (extra ``lightning``;
  tested in ``tests/test_integration_lightning.py``).
"""
