"""Fine-tune a small GPT-2 with SparseAdamW through Hugging Face's Trainer: CPU, seconds, no download.

    python examples/hf_trainer.py [--epochs 2] [--density 0.1]

The model has fixed random weights (a real run loads a checkpoint with from_pretrained) and
learns English prose that ships with Python, byte by byte. All but the position table trains,
sparsely. The SparseGradCallback adds gradient statistics,
resource use and compute per resource (CPR) to the Trainer's log, and its stopper ends the run
early once the evaluation loss gained per device-hour stays below eta.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from sparse_grad import SparseAdamW, param_groups
from sparse_grad.cpr import MarginalReturnStopper
from sparse_grad.demo import prose_bytes
from sparse_grad.integrations.hf import SparseGradCallback

CONTEXT = 32


class Windows(torch.utils.data.Dataset):
    """Consecutive byte windows of ``data`` as causal-LM examples."""

    def __init__(self, data: torch.Tensor):
        self.windows = data[: data.numel() // CONTEXT * CONTEXT].view(-1, CONTEXT)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--density", type=float, default=0.2)
    cli = parser.parse_args(argv)
    torch.manual_seed(0)
    text = prose_bytes(9_000)
    train, held_out = Windows(text[:8_000]), Windows(text[8_000:])
    config = transformers.GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=cli.epochs, per_device_train_batch_size=16, learning_rate=1e-2,
            weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=3, logging_steps=8, eval_strategy="steps",
            eval_steps=8, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
        # The transformer blocks (transformer.h.N), the final norm and the token embedding (tied
        # to the output layer) at the density, tensors under 4096 elements densely, no decay for
        # biases and norms; the position table stays frozen.
        groups = param_groups(model, target_modules=["h", "ln_f", "wte"], density=cli.density,
                              weight_decay=args.weight_decay)
        optimizer = SparseAdamW(groups, lr=args.learning_rate, block_size=256)
        # Under FSDP or DeepSpeed, let the Trainer build it instead:
        #   Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, density=0.1, block_size=256))
        callback = SparseGradCallback(stopper=MarginalReturnStopper(window=3, eta=0.0, patience=2))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                                       optimizers=(optimizer, None))  # None: the Trainer makes the schedule
        callback.add_to(trainer)
        trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    last = {k: v for h in trainer.state.log_history for k, v in h.items()}
    print(f"{trainer.state.global_step} steps, eval loss {evals[0]:.3f} → {evals[-1]:.3f}, "
          f"gradient Gini {last['sparse_grad/grad_gini']:.2f}, mask churn {last['sparse_grad/mask_churn']:.2f}, "
          f"{last['sparse_grad/device_hours'] * 3600:.1f} s")
    return last


if __name__ == "__main__":
    main()
