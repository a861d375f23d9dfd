"""The low-density study's arithmetic: lr chosen on the tuning split (dense too), shares of dense
gain paired by repeat, factors at the chosen lr, and the markdown it writes."""
import math
import pytest

from sparse_grad.demo.experiment import config_for
from sparse_grad.demo.stages import VariantResult
from sparse_grad.demo.study import paired, run_study, run_task, to_markdown

START = 2.0


def _result(variant, repeat: int, val_loss: float, tune_loss: float) -> VariantResult:
    return VariantResult(name=variant.name, family=variant.family, density=variant.density, seed=repeat, steps=1,
                         curve=[{"step": 0, "val_loss": START}], val_losses=[val_loss] * 2, val_loss=val_loss,
                         val_stderr=0.0, optimizer_ms=1.0, step_ms=1.0, state_bytes=0, trained_fraction=1.0,
                         footprint_bytes=0, resources={"elapsed_s": 1.0 + repeat}, hyper=dict(variant.hyper),
                         tune_loss=tune_loss)


class FakeSetup:
    """Losses from a formula: dense is best at lr 2e-3, sparse at 6e-3 (by the tuning loss; the
    held-out loss prefers other lrs, which must not matter); error feedback helps at d=0.05."""

    def __init__(self):
        self.cfg = config_for(quick=True)
        self.data = {"stage2": "fake bytes"}
        self.calls = []

    def run(self, variant, repeat):
        self.calls.append((variant, repeat))
        lr = variant.hyper["lr"]
        best = 2e-3 if variant.family == "dense" else 6e-3
        tune = 1.0 + abs(math.log(lr / best))
        noise = 0.01 * repeat
        if variant.family == "dense":
            val = 1.0 + noise  # gain 1.0 (- noise)
        else:
            val = 2.0 - 0.5 * variant.density ** 0.1 + noise + (-0.1 if "error_feedback" in variant.name else 0.0)
        return _result(variant, repeat, val + (lr - best), tune)


def test_run_task_chooses_lr_on_the_tuning_split_and_pairs_shares_by_repeat():
    setup = FakeSetup()
    factors = (("error_feedback", {"error_feedback": True}), ("block 64", {"block_size": 64}))
    task = run_task(setup, (0.05,), (1.0, 3.0), repeats=2, factors=factors, log=lambda _: None)
    assert task["dense_lr"] == pytest.approx(2e-3) and task["start_val_loss"] == START
    rows = {(r["density"], r["setting"]): r for r in task["rows"]}
    assert rows[1.0, "dense lr x1"]["share"] == (1.0, 0.0)
    chosen = [r for r in task["rows"] if r.get("chosen")]
    assert [(r["density"], r["setting"]) for r in chosen] == [(0.05, "lr x3")]
    base = chosen[0]
    # shares per repeat: (start - loss_r) / (start - dense_loss_r), each repeat against its own dense run
    dense_losses = [1.0, 1.01]
    expected = [(START - (2.0 - 0.5 * 0.05 ** 0.1 + 0.01 * r)) / (START - dense_losses[r]) for r in range(2)]
    assert base["shares"] == pytest.approx(expected)
    assert base["share"][0] == pytest.approx(sum(expected) / 2)
    ef = rows[0.05, "error_feedback"]
    assert ef["lr"] == pytest.approx(6e-3)  # at the chosen lr
    assert ef["vs_base"][0] == pytest.approx(0.1 / 0.995, rel=1e-3)
    assert rows[0.05, "block 64"]["vs_base"][0] == pytest.approx(0.0, abs=1e-12)
    assert len(setup.calls) == 2 * (2 + 2 + 2)  # dense grid, norm grid, two factors; 2 repeats each
    text = to_markdown({"stage1": {"steps": 5, "stopped_by": "cap", "val_loss": 2.5}, "repeats": 2,
                        "config": {"stage2_steps": 1, "stage2_lr": 2e-3, "block_size": 128}, "machine": "cpu",
                        "elapsed_s": 1.0, "tasks": [task]})
    assert "**lr x3** (chosen)" in text and "| 0.05 | error_feedback | 0.006 |" in text


def test_paired_and_bad_input():
    assert paired([1.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(paired([1.0])[1])
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        run_study(config_for(quick=True), None, repeats=0)
    with pytest.raises(ValueError, match="densities must be in"):
        run_study(config_for(quick=True), None, densities=(0.0,))
    with pytest.raises(ValueError, match="lr_multipliers has repeated values"):
        run_study(config_for(quick=True), None, lr_multipliers=(1.0, 1.0))
