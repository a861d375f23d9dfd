"""PyTorch Lightning with SparseAdamW from ``configure_optimizers``: trains a few steps of the demo
LM, checkpoints through the Trainer, resumes from the checkpoint, and ends exactly where an
uninterrupted run ends (parameters and SparseAdamW state)."""
import pytest
import torch
from _models import one_thread
from _utils import assert_same

from sparse_grad import SparseAdamW
from sparse_grad.demo import TinyLM, lm_loss

lightning = pytest.importorskip("lightning")
from sparse_grad.cpr import MarginalReturnStopper  # noqa: E402
from sparse_grad.integrations.lightning import SparseGradCallback  # noqa: E402

CONTEXT = 12


class LitTinyLM(lightning.LightningModule):
    def __init__(self, **sparse_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM(CONTEXT, width=24, layers=2, heads=2)
        self.sparse_kwargs = sparse_kwargs

    def training_step(self, batch, batch_idx):
        x, y = batch
        return lm_loss(self.model, x, y)

    def configure_optimizers(self):
        opt = SparseAdamW(self.named_parameters(), lr=3e-3, **self.sparse_kwargs)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader():
    # Fresh random bytes; 3 batches per epoch, unshuffled, so every epoch sees the same batches
    # and a checkpoint at an epoch's end resumes exactly.
    tokens = torch.randint(0, 256, (9, CONTEXT + 1), generator=torch.Generator().manual_seed(3))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=3, shuffle=False)


def fit(root, epochs, ckpt_path=None, **sparse_kwargs):
    module = LitTinyLM(**sparse_kwargs)
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1,
                                                              save_top_k=-1)
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=root)
    with one_thread():
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer.optimizers[0]


@pytest.mark.parametrize("options", [{"density": 0.2, "block_size": 64},
                                     {"density": 0.1, "block_size": 32, "state_layout": "compact", "reselect_every": 2}])
def test_lightning_checkpoint_resume_is_exact(tmp_path, options):
    full, full_opt = fit(tmp_path / "full", epochs=2, **options)
    assert isinstance(full_opt, SparseAdamW) and full_opt.state
    first_epoch = tmp_path / "full" / "epoch=0.ckpt"
    assert first_epoch.exists()

    resumed, resumed_opt = fit(tmp_path / "resumed", epochs=2, ckpt_path=str(first_epoch), **options)
    fresh = LitTinyLM(**options)
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), fresh.parameters())), "training changed nothing"
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert_same(full_opt.state_dict(), resumed_opt.state_dict())
    assert resumed_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"] == 3e-3 * 0.5**3  # 6 steps


def test_resume_restores_the_optimizer_state_from_the_checkpoint(tmp_path):
    """The checkpoint file itself holds SparseAdamW's state: loading it into a fresh optimizer
    gives the state the run had at that step."""
    options = {"density": 0.2, "block_size": 64}
    fit(tmp_path, epochs=1, **options)
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    module = LitTinyLM(**options)
    module.load_state_dict(checkpoint["state_dict"])
    opt = module.configure_optimizers()["optimizer"]
    opt.load_state_dict(checkpoint["optimizer_states"][0])
    assert_same(opt.state_dict(), checkpoint["optimizer_states"][0])
    assert all(p in opt.state for p in module.parameters())


class RecordingLogger(lightning.pytorch.loggers.Logger):
    """What a logger (TensorBoard, W&B, CSV) is sent."""
    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


class LitWithValidation(LitTinyLM):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", lm_loss(self.model, x, y))


def long_loader(n=30):
    tokens = torch.randint(0, 256, (n, CONTEXT + 1), generator=torch.Generator().manual_seed(4))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=3, shuffle=False)


def fit_with_callback(root, callback, max_steps=20):
    module = LitWithValidation(density=0.2, block_size=64)
    logger = RecordingLogger()
    trainer = lightning.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                                val_check_interval=2, num_sanity_val_steps=0, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                                log_every_n_steps=1)
    with one_thread():
        trainer.fit(module, long_loader(), long_loader(6))
    return trainer, logger


def test_callback_logs_gradient_statistics_resources_and_cpr_and_can_stop(tmp_path):
    # an eta no return reaches: the second validation (step 4) gives the first return, and stops
    callback = SparseGradCallback(stopper=MarginalReturnStopper(window=1, eta=1e30, patience=1))
    trainer, logger = fit_with_callback(tmp_path, callback)
    assert trainer.global_step == 4, "the stopper did not stop training"
    logged = {}
    for step, metrics in logger.metrics:
        for key, value in metrics.items():
            logged.setdefault(key, []).append((step, value))
    assert len(logged["sparse_grad/grad_gini"]) == 4 and all(0 <= v <= 1 for _, v in logged["sparse_grad/grad_gini"])
    assert all(0 < v <= 1 for _, v in logged["sparse_grad/grad_top_share"])
    assert all(0 <= v <= 1 for _, v in logged["sparse_grad/mask_churn"])
    hours = [v for _, v in logged["sparse_grad/device_hours"]]
    assert hours == sorted(hours) and hours[0] > 0
    assert [s for s, _ in logged["sparse_grad/cpr"]] == [3]  # the first validation has nothing to compare
    assert float(trainer.callback_metrics["sparse_grad/cpr"]) == pytest.approx(logged["sparse_grad/cpr"][0][1])


def test_callback_without_a_stopper_trains_to_the_end(tmp_path):
    trainer, logger = fit_with_callback(tmp_path, SparseGradCallback(log_every_n_steps=3, resources=False), max_steps=6)
    assert trainer.global_step == 6
    steps = [step for step, metrics in logger.metrics if "sparse_grad/grad_gini" in metrics]
    assert steps == [2, 5]  # after optimizer steps 3 and 6, at their 0-based index as Lightning logs
    assert not any("sparse_grad/device_hours" in metrics for _, metrics in logger.metrics)


def test_callback_bad_input():
    with pytest.raises(ValueError, match="log_every_n_steps must be a positive int or None"):
        SparseGradCallback(log_every_n_steps=0)
    with pytest.raises(TypeError, match="stopper must be a sparse_grad.cpr.MarginalReturnStopper"):
        SparseGradCallback(stopper="yes")
    with pytest.raises(TypeError, match="gradient_stats needs SparseAdamW's score hook"):
        SparseGradCallback().stats.begin(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
