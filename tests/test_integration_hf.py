"""Hugging Face Trainer with SparseAdamW: a tiny randomly initialized GPT-2 (no download) trains a
few steps, checkpoints through the Trainer, resumes, and ends exactly where an uninterrupted run
ends (parameters and SparseAdamW state)."""
import pytest
import torch
from _models import one_thread
from _utils import assert_same

from sparse_grad import SparseAdamW
from sparse_grad.integrations.hf import (
    create_optimizer,
    create_optimizer_and_scheduler,
    decay_parameter_names,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB, LENGTH = 61, 12  # odd sizes


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=24, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=1):
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **overrides):
    options = {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                   "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-7, "warmup_steps": 2,
                   "lr_scheduler_type": "linear", "save_strategy": "steps", "save_steps": 3, "logging_strategy": "no",
                   "report_to": [], "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True}
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def train(out, resume=None, **sparse_kwargs):
    model = tiny_gpt2()
    args = training_args(out)
    optimizers = create_optimizer_and_scheduler(model, args, **sparse_kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=optimizers)
    with one_thread():
        trainer.train(resume_from_checkpoint=resume)
    return model, optimizers[0]


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_trainer_checkpoint_resume_is_exact(tmp_path, layout):
    options = {"density": 0.3, "block_size": 64, "state_layout": layout}
    full_model, full_opt = train(tmp_path / "full", **options)
    assert (tmp_path / "full" / "checkpoint-3" / "optimizer.pt").exists()
    start = tiny_gpt2()
    changed = [n for n, p in full_model.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert changed, "training changed nothing"

    resumed_model, resumed_opt = train(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"),
                                       **options)
    assert isinstance(resumed_opt, SparseAdamW)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    assert_same(full_opt.state_dict(), resumed_opt.state_dict())
    assert resumed_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]


def test_create_optimizer_follows_the_training_arguments(tmp_path):
    model = tiny_gpt2()
    opt = create_optimizer(model, training_args(tmp_path), density=0.1, block_size=32, scope="tensor")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["lr"] == 5e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
        assert group["density"] == 0.1 and group["block_size"] == 32 and group["scope"] == "tensor"
    # HF's rule: biases and LayerNorm weights get no decay; matrices and embeddings do.
    assert "transformer.h.0.ln_1.weight" in no_decay["param_names"]
    assert "transformer.h.0.attn.c_attn.bias" in no_decay["param_names"]
    assert "transformer.h.0.attn.c_attn.weight" in decay["param_names"]
    assert "transformer.wte.weight" in decay["param_names"]
    expected = set(transformers.Trainer(model=model, args=training_args(tmp_path)).get_decay_parameter_names(model))
    named = {n for n, _ in model.named_parameters()}  # HF's list also names the tied lm_head.weight
    assert decay_parameter_names(model) == expected & named


def test_frozen_parameters_are_left_out(tmp_path):
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    opt = create_optimizer(model, training_args(tmp_path))
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert "transformer.wpe.weight" not in names and len(names) == sum(p.requires_grad for p in model.parameters())


def test_bad_input_is_named(tmp_path):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="lr come from the TrainingArguments"):
        create_optimizer(model, training_args(tmp_path), lr=1e-3)
    with pytest.raises(TypeError, match="has no 'learning_rate'"):
        create_optimizer(model, object())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        decay_parameter_names("model")
    with pytest.raises(ValueError, match="num_training_steps must be a positive int"):
        create_optimizer_and_scheduler(model, training_args(tmp_path, max_steps=-1))
    with pytest.raises(ValueError, match="density"):
        create_optimizer(model, training_args(tmp_path), density=1.5)
