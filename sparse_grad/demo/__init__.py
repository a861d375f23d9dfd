"""A small real workload for examples, the CLI and tests: a byte-level transformer language model
(:mod:`.model`) trained on the source of Python's own standard library (:mod:`.data`), which ships
with every Python, so nothing has to be downloaded; English prose for adaptation comes from
``pydoc_data.topics``."""
from .data import (
    batches,
    prose_bytes,
    prose_text,
    stdlib_bytes,
    stdlib_text,
    train_tune_test_split,
    train_val_split,
    window_sampler,
)
from .model import TinyLM, lm_loss, lm_losses
from .train import train_steps

__all__ = ["TinyLM", "batches", "lm_loss", "lm_losses", "prose_bytes", "prose_text", "stdlib_bytes", "stdlib_text",
           "train_steps", "train_tune_test_split", "train_val_split",
           "window_sampler"]
