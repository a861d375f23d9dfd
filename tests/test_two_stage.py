"""The README's two-stage recipe, end to end on the demo model: a dense first stage records a
blueprint, a blueprint-guided sparse second stage runs under a resource meter and a stopper."""
import torch
from _models import one_thread

from sparse_grad import SparseAdamW
from sparse_grad.analysis import GradientMonitor
from sparse_grad.blueprint import Blueprint
from sparse_grad.cpr import MarginalReturnStopper, ResourceMeter
from sparse_grad.demo import TinyLM, batches, lm_loss, stdlib_bytes, train_val_split


def test_two_stages(tmp_path):
    with one_thread():
        two_stages(tmp_path)


def two_stages(tmp_path):
    train, val = train_val_split(stdlib_bytes(100_000))
    model = TinyLM(16, width=32, layers=2, heads=2)

    monitor = GradientMonitor(model, block_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for x, y in batches(train, 15, 8, 16, seed=1):
        lm_loss(model, x, y).backward()
        monitor.update()
        opt.step()
        opt.zero_grad()
    assert "heavy-tail report" in monitor.report().to_text()
    Blueprint.from_monitor(monitor, target_share=0.9).save(tmp_path / "stage1.safetensors")

    bp = Blueprint.load(tmp_path / "stage1.safetensors")
    bp.validate(model)
    density = bp.recommendations()["overall"]["density"]
    opt = SparseAdamW(model.named_parameters(), lr=3e-3, block_size=bp.block_size, density=density,
                      blueprint=bp, blueprint_weight=0.5)
    stopper = MarginalReturnStopper(window=2, eta=1e9, patience=1)  # any return is too low: stops early

    def val_loss():
        with torch.no_grad():
            return sum(lm_loss(model, x, y).item() for x, y in batches(val, 2, 8, 16, seed=2)) / 2

    checks = 0
    with ResourceMeter("cpu") as meter:
        meter.attach(opt)
        for step, (x, y) in enumerate(batches(train, 40, 8, 16, seed=3)):
            lm_loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            if step % 4 == 3:
                checks += 1
                if stopper.update(-val_loss(), meter.gamma("device_hours")):
                    break
    assert 0 < density < 1 and stopper.should_stop and checks == 3  # window 2 + patience 1
    report = meter.report()
    assert report.samples >= 12 and report.device_hours > 0 and report.state_gib_hours > 0
