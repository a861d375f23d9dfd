"""``python -m sparse_grad demo --quick``: runs end to end and writes outputs that parse and make
sense; the stage-2 runner and the variants on their own."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import one_thread

from sparse_grad import SparseAdamW
from sparse_grad.demo import TinyLM, batches, prose_bytes, train_val_split
from sparse_grad.demo.experiment import config_for, run_demo
from sparse_grad.demo.report import write_outputs
from sparse_grad.demo.stages import run_variant
from sparse_grad.demo.variants import (
    fixed_layers,
    sparse,
    standard_variants,
    trained_by_fixed_layers,
)

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("heavy_tail.png", "loss_vs_step.png", "loss_vs_resource.png", "mask_churn.png")


def test_demo_quick_command_writes_outputs_that_parse(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "sparse_grad", "demo", "--quick", "--out", str(out), "--threads", "1"],
                         check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # progress bars; --quick: 14 variants, 23 runs (lr grid x1, x10; blueprint and compact borrow norm's
    # lr; the sparse_backward variant runs once at its twin's)
    assert "stage 1: dense AdamW" in run.stderr and "stage 2 [23/23]" in run.stderr
    assert "AdamW (dense)" in run.stdout and "random d=0.05" in run.stdout and "CPR/dense" in run.stdout

    results = json.loads((out / "results.json").read_text())
    names = [r["variant"] for r in results["summary"]]
    assert names[0] == "AdamW (dense)" and len(names) == 14
    assert names[-3:-1] == ["norm d=0.05 R=10", "norm d=0.05 R=10 +SB"]
    assert {f"{f} d={d:g}" for f in ("norm", "random", "blueprint") for d in (0.01, 0.05, 0.2)} <= set(names)
    assert [g["variant"] for g in results["tuning"]] == names
    assert all(row["lr"] in (2e-3, 2e-2) for row in results["summary"])
    dense = results["summary"][0]
    assert dense["cpr_vs_dense"] == 1.0 and dense["delta_vs_dense"] == 0.0
    for row in results["summary"]:
        assert math.isfinite(row["val_loss"]) and 0 < row["val_loss"] < math.log(256)
        assert row["optimizer_ms"] > 0 and row["step_ms"] >= row["optimizer_ms"] and row["footprint_mib"] > 0
    for run_ in results["stage2"]:
        losses = [p["val_loss"] for p in run_["curve"]]
        assert all(math.isfinite(v) for v in losses) and run_["curve"][-1]["step"] == results["config"]["stage2_steps"]
        if run_["family"] in ("norm", "random", "blueprint", "compact"):
            assert len(run_["churn"]) == run_["steps"] - 1 and all(0 <= c <= 1 for c in run_["churn"])
    dense_run = results["stage2"][0]
    assert dense_run["curve"][-1]["val_loss"] < dense_run["curve"][0]["val_loss"] - 0.05  # adaptation works
    stage1 = results["stage1"]
    assert stage1["curve"][-1]["val_loss"] < stage1["curve"][0]["val_loss"]
    assert stage1["stopped_by"] in ("stopper", "cap") and 0 < stage1["heavy_tail"]["gini"] < 1
    # Compact state holds moments for the selected blocks only.
    by_name = {r["variant"]: r for r in results["summary"]}
    assert by_name["compact d=0.05"]["state_mib"] < 0.5 * by_name["norm d=0.05"]["state_mib"]
    assert {c["kind"] for c in results["comparisons"]} >= {"norm vs random", "norm vs blueprint", "dense vs norm"}
    # sparse_backward: the same numbers as its twin (GEMM summation order aside), another cost
    assert by_name["norm d=0.05 R=10 +SB"]["val_loss"] == pytest.approx(by_name["norm d=0.05 R=10"]["val_loss"],
                                                                        rel=1e-4)
    assert by_name["norm d=0.05 R=10 +SB"]["lr"] == by_name["norm d=0.05 R=10"]["lr"]
    assert any(f.startswith("sparse_backward (norm d=0.05 R=10 +SB vs norm d=0.05 R=10): the same held-out loss")
               for f in results["findings"])
    recorded = json.loads((out / "tuning.json").read_text())  # --quick searched: a reusable recording
    assert [c["variant"] for c in recorded["choices"]] == names and recorded["config"]["stage2_steps"] == 40

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == names and float(rows[0]["val_loss"]) == dense["val_loss"]
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "norm-based vs random selection" in report and "CPR" in report
    matplotlib_image = pytest.importorskip("matplotlib.image")
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG and f"]({name})" in report
        image = matplotlib_image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    from sparse_grad.blueprint import Blueprint
    assert Blueprint.load(out / "stage1_blueprint.safetensors").steps == stage1["steps"]


def small_setup(steps=6):
    train, val = train_val_split(prose_bytes(40_000))
    torch.manual_seed(0)
    start = TinyLM(16, width=32, layers=2, heads=2).state_dict()

    def make_model():
        model = TinyLM(16, width=32, layers=2, heads=2)
        model.load_state_dict(start)
        return model

    return make_model, batches(train, steps, 4, 16, seed=1), list(batches(val, 3, 4, 16, seed=2))


def test_run_variant_measures_a_sparse_run():
    make_model, train, val = small_setup()
    variant = sparse("norm", 0.1, lr=3e-3, weight_decay=0.0, block_size=64)
    with one_thread():
        r = run_variant(variant, make_model, train, val, steps=6, eval_every=4, device=torch.device("cpu"),
                        progress=False)
    assert [p["step"] for p in r.curve] == [0, 4, 6] and r.curve[0]["train_loss"] is None
    assert len(r.val_losses) == 3 and r.val_loss == pytest.approx(sum(r.val_losses) / 3)
    assert r.optimizer_ms > 0 and r.step_ms > r.optimizer_ms and r.trained_fraction == 1.0
    assert len(r.churn) == 5 and r.resources["elapsed_s"] > 0 and r.resources["state_gib_hours"] > 0
    params = sum(p.numel() * 4 for p in make_model().parameters())
    assert r.state_bytes > 2 * params and r.footprint_bytes == 2 * params + r.state_bytes


def test_random_selection_churns_and_is_reproducible():
    make_model, _, val = small_setup()
    variant = sparse("random", 0.1, lr=3e-3, weight_decay=0.0, block_size=64)
    runs = []
    for seed in (0, 0, 1):
        _, train, _ = small_setup()
        with one_thread():
            runs.append(run_variant(variant, make_model, train, val, steps=6, eval_every=6,
                                    device=torch.device("cpu"), seed=seed, progress=False))
    assert runs[0].val_losses == runs[1].val_losses and runs[0].churn == runs[1].churn
    assert runs[0].val_losses != runs[2].val_losses
    assert min(runs[0].churn) > 0.5  # 10% of the blocks drawn at random: most are new each step


def test_fixed_layers_trains_only_the_last_layers():
    make_model, train, val = small_setup()
    model = make_model()
    keep = trained_by_fixed_layers(model, 1)
    assert keep and all(n.startswith(("layers.1.", "norm.", "head.")) for n in keep)
    with one_thread():
        r = run_variant(fixed_layers(3e-3, 0.0), make_model, train, val, steps=6, eval_every=3,
                        device=torch.device("cpu"), progress=False)
    total = sum(p.numel() for p in model.parameters())
    assert r.trained_fraction == pytest.approx(sum(p.numel() for n, p in model.named_parameters() if n in keep) / total)
    assert r.churn == [] and r.curve[-1]["val_loss"] < r.curve[0]["val_loss"]
    with pytest.raises(ValueError, match="last must be in"):
        trained_by_fixed_layers(model, 3)


def test_bad_input_is_named():
    make_model, train, val = small_setup()
    variant = sparse("norm", 0.1, lr=3e-3, weight_decay=0.0, block_size=64)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run_variant(variant, make_model, train, val, steps=0, eval_every=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        run_variant(variant, make_model, train, val, steps=2, eval_every=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="fewer than steps"), one_thread():
        run_variant(variant, make_model, train, val, steps=10, eval_every=5, device=torch.device("cpu"),
                    progress=False)
    with pytest.raises(ValueError, match="family must be"):
        sparse("magic", 0.1, lr=1e-3, weight_decay=0.0, block_size=64)
    with pytest.raises(ValueError, match="needs blueprint"):
        standard_variants([0.1], lr=1e-3, weight_decay=0.0, block_size=64, blueprint=None)
    with pytest.raises(ValueError, match="size must be one of"):
        config_for("huge")
    with pytest.raises(ValueError, match="densities must be in"):
        run_demo(config_for(quick=True, densities=(0.0,)), Path("unused"))


def test_outputs_of_a_tiny_in_process_run(tmp_path):
    """Two densities, two repeats: the standard error then comes from the repeats."""
    cfg = config_for(quick=True, densities=(0.1, 0.3), repeats=2, stage1_steps=30, stage2_steps=12, eval_every=6,
                     compact_density=None, interval_density=None, fixed_last_layers=0, source_bytes=60_000,
                     prose_bytes=60_000, lr_multipliers=(1.0,))  # one lr: the grid is test_demo_tuning's
    with one_thread():
        results = run_demo(cfg, tmp_path, progress=False)
        table, files = write_outputs(results, tmp_path)
    assert len(results.variants) == 2 * 7 and all(f.exists() for f in files)
    data = json.loads((tmp_path / "results.json").read_text())
    norm_vs_random = [c for c in data["comparisons"] if c["kind"] == "norm vs random"]
    assert len(norm_vs_random) == 2 and all(c["basis"] == "2 repeats" for c in norm_vs_random)
    assert all("repeats" in c["basis"] for c in data["comparisons"])
    assert "standard error over the 2 repeats" in (tmp_path / "report.md").read_text()
    assert isinstance(SparseAdamW, type) and "norm d=0.3" in table


def test_cli_rejects_bad_options_before_training(tmp_path, capsys):
    from sparse_grad.cli import main

    assert main(["demo", "--quick", "--densities", "0.1", "1.0", "--out", str(tmp_path / "x")]) == 2
    assert "densities must be in (0, 1)" in capsys.readouterr().err
    assert main(["demo", "--quick", "--stage2-steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "stage2_steps must be a positive int" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_run_variant_hands_the_model_to_a_batch_source():
    """A callable train source sees the model being trained (for data selection)."""
    make_model, _, val = small_setup()
    train_data, _ = train_val_split(prose_bytes(40_000))
    seen = []

    def source(model):
        seen.append(model)
        for x, y in batches(train_data, 4, 4, 16, seed=5):
            assert model.training  # evaluation switched it back
            yield x, y

    with one_thread():
        r = run_variant(sparse("norm", 0.2, lr=3e-3, weight_decay=0.0, block_size=64), make_model, source, val,
                        steps=4, eval_every=2, device=torch.device("cpu"), progress=False)
    assert len(seen) == 1 and isinstance(seen[0], TinyLM) and [p["step"] for p in r.curve] == [0, 2, 4]


def test_stage1_stops_by_the_stopper_and_saves_a_blueprint(tmp_path):
    from sparse_grad.blueprint import Blueprint
    from sparse_grad.cpr import MarginalReturnStopper
    from sparse_grad.demo import stdlib_bytes
    from sparse_grad.demo.stages import run_stage1

    train, val = train_val_split(stdlib_bytes(40_000))
    torch.manual_seed(0)
    model = TinyLM(16, width=32, layers=1, heads=2)
    stopper = MarginalReturnStopper(window=1, eta=1e9, patience=1)  # any return is too low
    with one_thread():
        result = run_stage1(model, batches(train, 20, 4, 16, seed=1), list(batches(val, 2, 4, 16, seed=2)), steps=20,
                            lr=3e-3, weight_decay=0.0, block_size=64, check_every=3, stopper=stopper,
                            blueprint_path=tmp_path / "bp.safetensors", device=torch.device("cpu"), progress=False)
    assert result.stopped_by == "stopper" and result.steps == 6 and [p["step"] for p in result.curve] == [3, 6]
    assert len(result.cpr) == 1 and result.resources["elapsed_s"] > 0
    assert Blueprint.load(tmp_path / "bp.safetensors").steps == 6
    assert all(torch.equal(result.state[k], v) for k, v in model.state_dict().items())
    summary = result.summary()
    assert "state" not in summary and 0 < summary["heavy_tail"]["gini"] < 1


def test_interval_variants_train_to_the_same_numbers_with_and_without_sparse_backward():
    """Norm selection every 3 steps: with sparse_backward the Linear layers compute only the
    selected blocks' weight gradients between reselections, and the run ends at the same losses
    (GEMM summation order aside); the churn, read from the selection after each step (no score
    hook, which would force full gradients), is zero between reselections."""
    make_model, _, val = small_setup(steps=7)
    plain = sparse("interval", 0.1, lr=3e-3, weight_decay=0.0, block_size=64, reselect_every=3,
                   name="norm d=0.1 R=3")
    with_sb = sparse("interval", 0.1, lr=3e-3, weight_decay=0.0, block_size=64, reselect_every=3,
                     sparse_backward=True, twin_of=plain.name, name="norm d=0.1 R=3 +SB")
    assert with_sb.with_hyper(lr=1e-3).twin_of == plain.name  # the tuner's copies keep it
    runs = []
    for variant in (plain, with_sb):
        _, train, _ = small_setup(steps=7)
        with one_thread():
            runs.append(run_variant(variant, make_model, train, val, steps=7, eval_every=7,
                                    device=torch.device("cpu"), progress=False))
    # fp32 losses after 7 Adam steps whose selected-block grads differ by GEMM rounding only
    assert runs[1].val_losses == pytest.approx(runs[0].val_losses, rel=1e-4)
    assert runs[1].twin_of == plain.name and runs[0].twin_of is None
    for r in runs:  # reselections at steps 1, 4, 7: the churn counts from step 2 on
        assert len(r.churn) == 6 and r.churn[0] == r.churn[1] == r.churn[3] == r.churn[4] == 0
        assert r.churn[2] + r.churn[5] > 0
    model = make_model()
    opt = with_sb.build(model, 0)
    assert all(g["reselect_every"] == 3 for g in opt.param_groups)
    assert getattr(model.layers[0].mlp_in, "_sparse_grad_backward", None) is not None  # patched
    with pytest.raises(ValueError, match="reselect_every >= 2"):
        sparse("interval", 0.1, lr=1e-3, weight_decay=0.0, block_size=64)
    with pytest.raises(ValueError, match="sparse_backward needs family 'interval'"):
        sparse("norm", 0.1, lr=1e-3, weight_decay=0.0, block_size=64, sparse_backward=True)
    names = [v.name for v in standard_variants((0.05,), lr=1e-3, weight_decay=0.0, block_size=64,
                                               blueprint=object(), interval_density=0.05, reselect_every=10)]
    assert names[-3:] == ["norm d=0.05 R=10", "norm d=0.05 R=10 +SB", "last 1 layer (AdamW)"]


def test_mask_churn_observes_the_selection_after_each_step():
    from sparse_grad.analysis import MaskChurn

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7, 9))]
    opt = SparseAdamW(params, lr=1e-2, density=0.25, block_size=16, selection="random", seed=3)
    churn, hooked = MaskChurn(), MaskChurn()
    opt.register_score_hook(hooked)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        churn.observe(opt)
        churn.flush(), hooked.flush()
    assert churn.churn == hooked.churn and len(churn.churn) == 3 and max(churn.churn) > 0
