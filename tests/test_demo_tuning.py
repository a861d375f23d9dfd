"""The demo's per-variant tuning: three disjoint splits of the stage-2 data, every variant's grid,
the choice by the tuning split only, and what the report says about it and about stage 1's stop."""
import json
import math
from dataclasses import replace

import pytest
import torch
from _models import one_thread

from sparse_grad.demo import train_tune_test_split
from sparse_grad.demo.experiment import config_for, prepare, run_demo
from sparse_grad.demo.report import stage1_stop, write_outputs
from sparse_grad.demo.stages import VariantResult
from sparse_grad.demo.tuning import RECORDED, candidates, choose, recorded_choices, tune
from sparse_grad.demo.variants import dense_adamw, sparse, standard_variants

TINY = {"stage1_steps": 30, "stage2_steps": 12, "eval_every": 6, "source_bytes": 60_000, "prose_bytes": 60_000}


def test_three_way_split_is_disjoint_and_covers_the_data():
    data = torch.randperm(1001)
    train, tune_split, held_out = train_tune_test_split(data)
    assert (train.numel(), tune_split.numel(), held_out.numel()) == (800, 100, 101)
    assert torch.equal(torch.cat([train, tune_split, held_out]), data)
    assert not set(train.tolist()) & set(tune_split.tolist()) and not set(tune_split.tolist()) & set(held_out.tolist())
    for bad in ({"train_fraction": 0.95, "tune_fraction": 0.1}, {"tune_fraction": 0.0}, {"train_fraction": -0.1}):
        with pytest.raises(ValueError, match="train_fraction and tune_fraction"):
            train_tune_test_split(data, **bad)


def test_prepare_draws_tuning_and_held_out_batches_from_their_own_bytes(tmp_path, monkeypatch):
    """Stage-2 "text" whose bytes name their split (1 train, 2 tuning, 3 held out): every window
    a split's batches hold must lie inside that split."""
    cfg = config_for(quick=True, **TINY, val_batches=3)
    text = torch.empty(60_000, dtype=torch.long)
    train, tune_split, held_out = train_tune_test_split(text)
    train.fill_(1), tune_split.fill_(2), held_out.fill_(3)
    monkeypatch.setattr("sparse_grad.demo.experiment.stage2_bytes", lambda cfg: (text, "labelled bytes"))
    with one_thread():
        setup = prepare(cfg, tmp_path, progress=False)
    assert setup.train.unique().tolist() == [1]
    assert all(x.unique().tolist() == [2] for x, _ in setup.tune_batches)
    assert all(x.unique().tolist() == [3] and y.unique().tolist() == [3] for x, y in setup.val_batches)
    assert "tuning split" in setup.data["stage2"]


def _result(variant, tune_loss: float, val_loss: float = 1.0) -> VariantResult:
    return VariantResult(name=variant.name, family=variant.family, density=variant.density, seed=0, steps=1,
                         curve=[{"step": 0, "val_loss": 2.0}], val_losses=[val_loss, val_loss], val_loss=val_loss,
                         val_stderr=0.0, optimizer_ms=1.0, step_ms=1.0, state_bytes=0, trained_fraction=1.0,
                         footprint_bytes=0, resources={"elapsed_s": 1.0}, hyper=dict(variant.hyper),
                         tune_loss=tune_loss)


def test_tune_chooses_the_lowest_tuning_loss_and_borrows_norms_lr():
    """A fake trainer whose tuning loss is lowest at lr 6e-3 for sparse runs and 2e-3 for dense;
    the held-out loss points the other way, and must not influence the choice."""
    variants = standard_variants((0.05, 0.2), lr=2e-3, weight_decay=0.0, block_size=64, blueprint=object(),
                                 compact_density=0.05)
    ran = []

    def run(variant):
        ran.append(variant)
        best = 2e-3 if variant.family in ("dense", "fixed-layer") else 6e-3
        tune_loss = abs(math.log(variant.hyper["lr"] / best)) + abs(variant.hyper.get("blueprint_weight", 0.5) - 0.75)
        return _result(variant, tune_loss, val_loss=-tune_loss)

    choices = tune(variants, run, lr_multipliers=(1.0, 3.0, 10.0), blueprint_weights=(0.25, 0.75))
    chosen = {c.name: c.chosen.hyper for c in choices}
    assert [c.name for c in choices] == [v.name for v in variants]
    assert chosen["AdamW (dense)"] == {"lr": 2e-3} and chosen["last 1 layer (AdamW)"] == {"lr": 2e-3}
    assert chosen["norm d=0.05"]["lr"] == pytest.approx(6e-3) and chosen["random d=0.2"]["lr"] == pytest.approx(6e-3)
    # blueprint: norm's lr at its density, its weight from its own grid; compact: norm's lr, no grid
    assert chosen["blueprint d=0.2"] == pytest.approx({"lr": 6e-3, "blueprint_weight": 0.75})
    assert [r.hyper for r in next(c for c in choices if c.name == "compact d=0.05").runs] == [pytest.approx(
        {"lr": 6e-3})]
    dense_grid = [v.hyper["lr"] for v in ran if v.family == "dense"]
    assert dense_grid == pytest.approx([2e-3, 6e-3, 2e-2])  # dense gets the same grid
    assert len(ran) == 3 + 2 * 3 + 2 * 3 + 2 * 2 + 1 + 3


def test_choose_needs_tuning_losses_and_breaks_ties_by_grid_order():
    v = dense_adamw(1e-3, 0.0)
    a, b = _result(v, 0.5), _result(v.with_hyper(lr=3e-3), 0.5)
    assert choose([a, b]) is a
    with pytest.raises(ValueError, match="tune_loss"):
        choose([replace(a, tune_loss=None)])
    with pytest.raises(ValueError, match="no hyper-parameter 'blueprint_weight'"):
        v.with_hyper(blueprint_weight=0.5)
    with pytest.raises(ValueError, match="no hyper-parameter 'momentum'"):
        sparse("norm", 0.1, lr=1e-3, weight_decay=0.0, block_size=64).with_hyper(momentum=0.9)


def test_a_variant_without_hyper_parameters_runs_once_as_it_is():
    from sparse_grad.demo.variants import Variant

    plain = Variant("plain", "norm", lambda model, seed: None, density=0.1)
    assert candidates(plain, {}, (1.0, 3.0), (0.5,)) == [plain]


def test_compact_at_an_untuned_density_searches_its_own_lr():
    compact = sparse("compact", 0.3, lr=1e-3, weight_decay=0.0, block_size=64)
    grid = candidates(compact, {0.1: 5e-3}, (1.0, 2.0), (0.5,))
    assert [v.hyper["lr"] for v in grid] == pytest.approx([1e-3, 2e-3])
    assert [v.hyper["lr"] for v in candidates(replace(compact, density=0.1), {0.1: 5e-3}, (1.0, 2.0), (0.5,))] == [5e-3]


def test_tiny_demo_reports_the_chosen_lr_of_every_variant_and_why_stage1_stopped(tmp_path):
    """End to end: results.json has every grid, the chosen run per variant is its grid's lowest
    tuning loss, the table and the CSV carry the lr; stage 1 is made to stop by the stopper."""
    cfg = config_for(quick=True, **TINY, densities=(0.1,), compact_density=None, lr_multipliers=(1.0, 4.0),
                     blueprint_weights=(0.3, 0.6), check_every=5, stopper_window=1, stopper_patience=2,
                     stopper_eta=1e9)  # any return is below eta: the stopper fires at the 3rd check
    with one_thread():
        results = run_demo(cfg, tmp_path, progress=False)
        table, _ = write_outputs(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stage1"]["stopped_by"] == "stopper" and data["stage1"]["steps"] == 15
    for grid in data["tuning"]:
        best = min(grid["grid"], key=lambda g: g["tune_loss"])
        assert grid["chosen"] == best["hyper"]
        reported = next(r for r in data["stage2"] if r["name"] == grid["variant"])
        assert reported["hyper"] == best["hyper"] and reported["val_loss"] == best["val_loss"]
        assert reported["tune_loss"] != reported["val_loss"]  # two splits, two losses
    searched = {g["variant"]: [h["hyper"] for h in g["grid"]] for g in data["tuning"]}
    assert [h["lr"] for h in searched["AdamW (dense)"]] == pytest.approx([2e-3, 8e-3])
    assert [h["blueprint_weight"] for h in searched["blueprint d=0.1"]] == [0.3, 0.6]
    assert {h["lr"] for h in searched["blueprint d=0.1"]} == {data["tuning"][1]["chosen"]["lr"]}  # norm d=0.1's
    rows = {r["variant"]: r for r in data["summary"]}
    assert rows["AdamW (dense)"]["share_of_dense_gain"] == pytest.approx(1.0)
    assert all(rows[g["variant"]]["lr"] == g["chosen"]["lr"] for g in data["tuning"])
    assert f"{rows['norm d=0.1']['lr']:.3g}" in table
    report = (tmp_path / "report.md").read_text()
    assert "Stage 1 stopped at step 15 (cap 30) because its marginal return fell below eta=1e+09" in report
    assert "### Hyper-parameter grids" in report and "tuning split" in report
    assert stage1_stop(results) in table


def test_stage1_stop_says_when_the_cap_ended_it(tmp_path):
    cfg = config_for(quick=True, **TINY, densities=(0.1,), compact_density=None, fixed_last_layers=0,
                     lr_multipliers=(1.0,), blueprint_weights=(0.5,), check_every=10, stopper_eta=1e-9)
    with one_thread():
        results = run_demo(cfg, tmp_path, progress=False)
    assert results.stage1.stopped_by == "cap"
    assert stage1_stop(results).startswith("Stage 1 ran to its step cap (30) without the stopper firing")


def test_code_task_adapts_to_other_stdlib_modules(tmp_path):
    from sparse_grad.demo import stdlib_bytes

    cfg = config_for(quick=True, **TINY, task="code")
    with one_thread():
        setup = prepare(cfg, tmp_path, progress=False)
    after = stdlib_bytes(cfg.prose_bytes, skip=cfg.source_bytes)
    assert torch.equal(setup.train, after[:setup.train.numel()])
    assert torch.equal(stdlib_bytes(10, skip=5), stdlib_bytes(15)[5:])
    with pytest.raises(ValueError, match="task must be one of"):
        prepare(replace(cfg, task="poetry"), tmp_path)


def test_error_feedback_option_reaches_every_sparse_variant_and_survives_tuning():
    from sparse_grad.demo import TinyLM

    from sparse_grad.blueprint import Blueprint
    from sparse_grad.analysis import GradientMonitor

    model = TinyLM(16, width=32, layers=1, heads=2)
    monitor = GradientMonitor(model, block_size=64)
    model(torch.randint(0, 256, (2, 16))).sum().backward()
    monitor.update()
    variants = standard_variants((0.05,), lr=1e-3, weight_decay=0.0, block_size=64,
                                 blueprint=Blueprint.from_monitor(monitor), compact_density=0.05, fixed_last=0,
                                 error_feedback=True)
    assert [v.family for v in variants] == ["dense", "norm", "random", "blueprint", "compact"]
    for v in variants:
        opt = v.with_hyper(lr=3e-3).build(model, 0)  # the tuner's copies keep the option
        groups = opt.param_groups
        if v.family == "dense":
            assert v.name == "AdamW (dense)" and "error_feedback" not in groups[0]
        else:
            assert v.name.endswith("+EF") and all(g["error_feedback"] for g in groups)
            assert all(g["lr"] == 3e-3 for g in groups)
    with pytest.raises(TypeError, match="error_feedback must be a bool"):
        run_demo(config_for(quick=True, error_feedback=1), None)


def test_a_twin_runs_once_at_the_choice_of_the_variant_it_equals():
    variants = standard_variants((0.05,), lr=2e-3, weight_decay=0.0, block_size=64, blueprint=object(),
                                 fixed_last=0, interval_density=0.05, reselect_every=10)
    ran = []

    def run(variant):
        ran.append(variant)
        return _result(variant, abs(math.log(variant.hyper["lr"] / 6e-3)))

    choices = {c.name: c for c in tune(variants, run, lr_multipliers=(1.0, 3.0), blueprint_weights=(0.5,))}
    assert [v.hyper["lr"] for v in ran if v.name == "norm d=0.05 R=10"] == pytest.approx([2e-3, 6e-3])
    twin = [v for v in ran if v.name == "norm d=0.05 R=10 +SB"]
    assert len(twin) == 1 and twin[0].hyper["lr"] == pytest.approx(6e-3)
    assert choices["norm d=0.05 R=10 +SB"].searched is None
    assert ran.index(twin[0]) > max(i for i, v in enumerate(ran) if v.name == "norm d=0.05 R=10")
    lonely = [v for v in variants if v.name != "norm d=0.05 R=10"]
    with pytest.raises(ValueError, match="twin of 'norm d=0.05 R=10', which is not run"):
        tune(lonely, run, lr_multipliers=(1.0,), blueprint_weights=(0.5,))


def test_a_recorded_tuning_is_reused_run_once_per_variant_and_checked(tmp_path):
    """A run that searched writes tuning.json; a run of the same settings given it trains each
    variant once at the recorded choice and reproduces the searched run's chosen losses; a
    recording of other settings, or a tampered one, is refused with the reason and runs nothing."""
    cfg = config_for(quick=True, **TINY, densities=(0.1,), compact_density=None, fixed_last_layers=0,
                     lr_multipliers=(1.0, 4.0), blueprint_weights=(0.3, 0.6), interval_density=0.1,
                     reselect_every=4)
    searched_dir, reused_dir = tmp_path / "searched", tmp_path / "reused"
    with one_thread():
        searched = run_demo(cfg, searched_dir, progress=False)
        recording = searched_dir / "tuning.json"
        assert recording.exists() and searched.tuning_recorded is None
        reused = run_demo(cfg, reused_dir, progress=False, tuning=recording)
    assert not (reused_dir / "tuning.json").exists()
    assert reused.tuning_recorded["machine"] == searched.environment["machine"]
    assert [r.name for r in reused.variants] == [r.name for r in searched.variants]
    for a, b in zip(searched.variants, reused.variants):
        assert a.hyper == b.hyper and a.val_losses == b.val_losses  # one thread, same batches: bit-equal
    for a, b in zip(searched.tuning, reused.tuning):
        assert len(b.runs) == 1 and a.as_dict()["grid"] == b.as_dict()["grid"]
        assert b.as_dict()["source"] == "recorded" and a.as_dict()["source"] == "searched"
    with one_thread():
        table, _ = write_outputs(reused, reused_dir)
    assert "recorded run of the same settings" in (reused_dir / "report.md").read_text()

    variants = standard_variants(cfg.densities, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay,
                                 block_size=cfg.block_size, blueprint=object(), fixed_last=0,
                                 interval_density=0.1, reselect_every=4)
    assert recorded_choices(cfg, variants, recording)[0]["norm d=0.1"]["chosen"] == searched.tuning[1].chosen.hyper
    assert recorded_choices(replace(cfg, threads=2, repeats=3), variants, recording) is not None  # not in the key
    with pytest.raises(ValueError, match=r"does not fit this run: .*other settings \(stage2_lr\)"):
        recorded_choices(replace(cfg, stage2_lr=1e-3), variants, recording)
    original = json.loads(recording.read_text())
    tampered = [("[1, 2]", "needs the keys"),
                ("{not json", "is not JSON"),
                (json.dumps({**original, "choices": [{"variant": "x"}]}), "every choice needs"),
                (json.dumps({**original, "choices": [{**c, "chosen": {"lr": -1.0}} for c in original["choices"]]}),
                 "chosen lr must be a finite number >= 0"),
                (json.dumps({**original, "choices": [{**c, "chosen": {"lr": "1e-3"}} for c in original["choices"]]}),
                 "chosen lr must be a finite number"),
                (json.dumps({**original, "choices": [{**c, "chosen": {"momentum": 0.9}}
                                                     for c in original["choices"]]}), "hyper-parameters are")]
    bad = tmp_path / "bad.json"
    for text, message in tampered:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            recorded_choices(cfg, variants, bad)
    with pytest.raises(ValueError, match="does not exist"):
        recorded_choices(cfg, variants, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no choice for variant"):
        bad.write_text(json.dumps({**original, "choices": original["choices"][1:]}))
        recorded_choices(cfg, variants, bad)
    with pytest.raises(ValueError, match="takes no tuning recording"):
        run_demo(cfg, tmp_path / "x", progress=False, retune=True, tuning=recording)


def test_the_packaged_recording_fits_the_default_demo():
    """`python -m sparse_grad demo` reuses the packaged recording: it must have been made with
    the default settings and hold every default variant (change a default: rerun --retune and
    copy its tuning.json over sparse_grad/demo/recorded_tuning.json)."""
    cfg = config_for()
    variants = standard_variants(cfg.densities, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay,
                                 block_size=cfg.block_size, blueprint=object(), compact_density=cfg.compact_density,
                                 fixed_last=cfg.fixed_last_layers, error_feedback=cfg.error_feedback,
                                 interval_density=cfg.interval_density, reselect_every=cfg.reselect_every)
    found = recorded_choices(cfg, variants, RECORDED)
    assert found is not None
    entries, where = found
    assert set(entries) == {v.name for v in variants} and where["date_utc"]
    for entry in entries.values():  # each choice is the grid's lowest tuning loss
        if entry["searched"]:
            best = min(entry["grid"], key=lambda g: g["tune_loss"])
            assert entry["chosen"] == best["hyper"]
