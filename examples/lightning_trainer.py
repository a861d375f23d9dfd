"""Fine-tune a small byte-level transformer with SparseAdamW in PyTorch Lightning: CPU, seconds.

    python examples/lightning_trainer.py [--steps 30] [--density 0.2]

(Not named lightning.py: run as a script, that file would shadow the lightning package.)

The model (sparse_grad's demo TinyLM, fixed random weights) learns English prose that ships
with Python. configure_optimizers returns SparseAdamW over sparse_grad.param_groups: the MLPs at
a low density, the rest at the given one, the position table frozen. The SparseGradCallback
sends gradient statistics, resource use and CPR to the loggers, and its stopper may end the run.
"""
from __future__ import annotations

import argparse
import tempfile

import lightning
import torch

from sparse_grad import SparseAdamW, param_groups
from sparse_grad.cpr import MarginalReturnStopper
from sparse_grad.demo import TinyLM, batches, lm_loss, prose_bytes
from sparse_grad.integrations.lightning import SparseGradCallback

CONTEXT = 32


class LitLM(lightning.LightningModule):
    def __init__(self, density: float):
        super().__init__()
        self.model = TinyLM(CONTEXT, width=32, layers=2, heads=2)
        self.density = density

    def training_step(self, batch, batch_idx):
        loss = lm_loss(self.model, *batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", lm_loss(self.model, *batch))

    def configure_optimizers(self):
        groups = param_groups(self, target_modules=r"model\.(layers\.\d+\.\w+|embed|norm|head)",
                              density=self.density, densities={r"mlp_\w+": self.density / 2})
        return SparseAdamW(groups, lr=3e-3, block_size=256)


class Printer(lightning.pytorch.loggers.Logger):
    """A logger that prints (TensorBoard, CSV or W&B loggers get the same calls)."""
    name, version = "print", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        shown = {k.removeprefix("sparse_grad/"): round(float(v), 4) for k, v in metrics.items()
                 if k.startswith("sparse_grad/") and not k.endswith("hours") or k.endswith("loss")}
        print(f"step {step}: {shown}")


def main(argv: list[str] | None = None) -> lightning.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.2)
    cli = parser.parse_args(argv)
    lightning.seed_everything(0, verbose=False)
    text = prose_bytes(30_000)
    # ready-made (x, y) batches of random windows: batch_size=None hands them over as they are
    train = torch.utils.data.DataLoader(list(batches(text[:27_000], cli.steps, 16, CONTEXT, seed=0)), batch_size=None)
    val = torch.utils.data.DataLoader(list(batches(text[27_000:], 2, 16, CONTEXT, seed=1)), batch_size=None)
    callback = SparseGradCallback(log_every_n_steps=5, stopper=MarginalReturnStopper(window=3, eta=0.0, patience=2))
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning.Trainer(max_steps=cli.steps, accelerator="cpu", devices=1, logger=Printer(),
                                    callbacks=[callback], val_check_interval=5, log_every_n_steps=5,
                                    num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                                    enable_checkpointing=False, default_root_dir=root)
        trainer.fit(LitLM(cli.density), train, val)
    print(f"{trainer.global_step} steps, val loss {float(trainer.callback_metrics['val_loss']):.3f}")
    return trainer


if __name__ == "__main__":
    main()
