"""Hugging Face Trainer with SparseAdamW: a tiny randomly initialized GPT-2 (no download) trains a
few steps, checkpoints through the Trainer, resumes, and ends exactly where an uninterrupted run
ends (parameters and SparseAdamW state)."""
import pytest
import torch
from _models import one_thread
from _utils import assert_same

from sparse_grad import SparseAdamW
from sparse_grad.cpr import MarginalReturnStopper
from sparse_grad.integrations.hf import (
    SparseGradCallback,
    create_optimizer,
    create_optimizer_and_scheduler,
    decay_parameter_names,
    optimizer_cls_and_kwargs,
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


def train(out, resume=None, route="optimizers", args=None, **sparse_kwargs):
    """Train through the Trainer; ``route``: ``"optimizers"`` (our optimizer and scheduler) or
    ``"cls_and_kwargs"`` (the Trainer builds both, as under FSDP and DeepSpeed)."""
    model = tiny_gpt2()
    args = args or training_args(out)
    if route == "optimizers":
        routed = {"optimizers": create_optimizer_and_scheduler(model, args, **sparse_kwargs)}
    else:
        routed = {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(args, **sparse_kwargs)}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), **routed)
    with one_thread():
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer.optimizer.optimizer  # accelerate's wrapper holds it


@pytest.mark.parametrize("layout, route", [("dense", "optimizers"), ("compact", "optimizers"),
                                           ("compact", "cls_and_kwargs")])
def test_trainer_checkpoint_resume_is_exact(tmp_path, layout, route):
    options = {"density": 0.3, "block_size": 64, "state_layout": layout, "route": route}
    full_model, full_opt = train(tmp_path / "full", **options)
    assert isinstance(full_opt, SparseAdamW)
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
        create_optimizer_and_scheduler(model, training_args(tmp_path), num_training_steps=0)
    with pytest.raises(ValueError, match="lr come from the TrainingArguments"):
        optimizer_cls_and_kwargs(training_args(tmp_path), lr=1e-3)
    with pytest.raises(TypeError, match="stopper must be a sparse_grad.cpr.MarginalReturnStopper"):
        SparseGradCallback(stopper=3)
    with pytest.raises(ValueError, match="resource must be one of"):
        SparseGradCallback(resource="hours")
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        SparseGradCallback().add_to(object())
    with pytest.raises(ValueError, match="density"):
        create_optimizer(model, training_args(tmp_path), density=1.5)


def test_optimizer_cls_and_kwargs_carries_the_training_arguments(tmp_path):
    args = training_args(tmp_path)
    cls, kwargs = optimizer_cls_and_kwargs(args, density=0.2, block_size=32, fused=True)
    assert cls is SparseAdamW
    assert kwargs == {"lr": 5e-3, "betas": (0.8, 0.95), "eps": 1e-7, "density": 0.2, "block_size": 32, "fused": True}
    model = tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(),
                                   optimizer_cls_and_kwargs=(cls, kwargs))
    opt = trainer.create_optimizer()
    assert isinstance(opt, SparseAdamW) and sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert all(g["lr"] == 5e-3 and g["density"] == 0.2 and g["fused"] for g in opt.param_groups)


def test_an_epoch_based_run_gets_the_trainers_scheduler(tmp_path):
    """No max_steps: the Trainer makes the scheduler over the steps its data loader gives, and
    the run equals one with those steps given as max_steps."""
    options = {"density": 0.3, "block_size": 64}
    by_epochs = training_args(tmp_path / "epochs", max_steps=-1, num_train_epochs=2, save_strategy="no")
    assert create_optimizer_and_scheduler(tiny_gpt2(), by_epochs, **options)[1] is None
    epoch_model, _ = train(None, args=by_epochs, **options)
    steps = 2 * len(RandomTokens()) // 4
    by_steps = training_args(tmp_path / "steps", max_steps=steps, save_strategy="no")
    step_model, step_opt = train(None, args=by_steps, **options)
    assert step_opt.param_groups[0]["lr"] == 0.0  # the linear schedule ran to its end
    for (name, a), b in zip(epoch_model.named_parameters(), step_model.parameters()):
        assert torch.equal(a, b), name


class Recorder(transformers.TrainerCallback):
    """Stands in for a report_to integration: what its on_log sees."""
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_callback_logs_gradient_statistics_resources_and_cpr_and_can_stop(tmp_path):
    args = training_args(tmp_path, max_steps=20, logging_strategy="steps", logging_steps=1, eval_strategy="steps",
                         eval_steps=2, save_strategy="no", per_device_eval_batch_size=8)
    model = tiny_gpt2()
    recorder = Recorder()
    # an eta no return reaches: the second evaluation (step 4) gives the first return, and stops
    callback = SparseGradCallback(stopper=MarginalReturnStopper(window=1, eta=1e30, patience=1))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(),
                                   eval_dataset=RandomTokens(8, seed=2), callbacks=[recorder],
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, density=0.3, block_size=64))
    callback.add_to(trainer)
    with one_thread():
        trainer.train()
    assert trainer.state.global_step == 4, "the stopper did not stop training"
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert all(0.0 <= h["sparse_grad/grad_gini"] <= 1.0 and 0.0 < h["sparse_grad/grad_top_share"] <= 1.0
               for h in train_logs)
    assert all(0.0 <= h["sparse_grad/mask_churn"] <= 1.0 for h in train_logs[1:])
    hours = [h["sparse_grad/device_hours"] for h in train_logs]
    assert hours == sorted(hours) and hours[0] > 0 and all(h["sparse_grad/state_gib_hours"] > 0 for h in train_logs)
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) == 2 and "sparse_grad/cpr" not in evals[0]
    assert evals[1]["sparse_grad/cpr"] == evals[1]["sparse_grad/cpr_windowed"]
    # the report_to stand-in, after the callback, saw the same figures
    assert any("sparse_grad/cpr" in logs for logs in recorder.seen)
    assert sum("sparse_grad/grad_gini" in logs for logs in recorder.seen) == len(train_logs)


def test_callback_without_a_stopper_trains_to_the_end(tmp_path):
    args = training_args(tmp_path, max_steps=4, logging_strategy="steps", logging_steps=2, save_strategy="no")
    model = tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(),
                                   callbacks=[SparseGradCallback(resources=False)],
                                   optimizers=create_optimizer_and_scheduler(model, args, density=0.3, block_size=64))
    with one_thread():
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 4 and len(logs) == 2
    assert all("sparse_grad/grad_gini" in h and "sparse_grad/device_hours" not in h for h in logs)
