"""``python -m sparse_grad analyze`` and ``python -m sparse_grad blueprint {show,validate,combine}``."""
import json
import re
import subprocess
import sys

import pytest
import torch

from _models import one_thread

from sparse_grad.blueprint import Blueprint
from sparse_grad.cli import build_parser, main

TINY = ["--steps", "6", "--batch", "4", "--context", "16", "--width", "32", "--layers", "1", "--heads", "2",
        "--block-size", "64", "--bytes", "30000"]
MODEL = TINY[4:12]  # the model's size options
PNG = b"\x89PNG\r\n\x1a\n"


def cli(capsys, *argv):
    with one_thread():
        status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_analyze_trains_reports_plots_and_rereads_its_dump(tmp_path, capsys):
    dump, bp = tmp_path / "out" / "dump.safetensors", tmp_path / "out" / "bp.safetensors"
    status, out, _ = cli(capsys, "analyze", *TINY, "--out", tmp_path / "plots", "--save-dump", dump,
                         "--blueprint", bp, "--per-tensor")
    assert status == 0
    assert "trained 6 steps with adamw" in out and "heavy-tail report" in out and "top 20% hold" in out
    assert "layers.0.attn_qkv.weight" in out  # --per-tensor
    for name in ("heavy_tail.png", "module_heatmap.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    assert Blueprint.load(bp).steps == 6
    status, again, _ = cli(capsys, "analyze", "--dump", dump, "--no-plots", "--per-tensor")
    report = out[out.index("heavy-tail report"):out.index("wrote")]
    assert status == 0 and again.strip() == report.strip()


def test_analyze_with_sparse_adamw_and_a_depth(capsys):
    status, out, _ = cli(capsys, "analyze", *TINY, "--optimizer", "sparse", "--density", "0.3", "--depth", "1",
                         "--accumulate", "ema", "--no-plots")
    assert status == 0 and "trained 6 steps with sparse" in out and "(ema(beta=0.9))" in out
    assert "\nlayers " in out and "attn_qkv" not in out  # modules cut to one component


def test_blueprint_show_validate_combine(tmp_path, capsys):
    a, b, both = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "both.safetensors"
    for path, seed in ((a, 0), (b, 1)):
        assert cli(capsys, "analyze", *TINY, "--seed", seed, "--no-plots", "--blueprint", path)[0] == 0
    status, out, _ = cli(capsys, "blueprint", "show", a, "--per-tensor")
    assert status == 0 and "fingerprint" in out and "recommended:" in out and "head.weight" in out
    status, out, _ = cli(capsys, "blueprint", "validate", a, *MODEL, "--block-size", "64")
    assert status == 0 and "fits the model" in out
    status, out, _ = cli(capsys, "blueprint", "validate", a, "--context", "16", "--width", "48", "--layers", "1",
                         "--heads", "2")
    assert status == 1 and "does not fit" in out and "'position' has shape (16, 48) in the model" in out
    status, out, _ = cli(capsys, "blueprint", "validate", a, *MODEL, "--block-size", "128")
    assert status == 1 and "reblock(128)" in out
    status, out, _ = cli(capsys, "blueprint", "validate", a, "--model", "torch.nn:Identity")
    assert status == 1 and "not a trainable parameter of the model" in out
    status, out, _ = cli(capsys, "blueprint", "combine", both, a, b, "--weights", "1", "3")
    assert status == 0 and "weights [0.25, 0.75]" in out and Blueprint.load(both).steps == 12
    status, _, err = cli(capsys, "blueprint", "combine", both, a, b, "--weights", "1")
    assert status == 2 and "error: weights has 1 entries for 2 blueprints" in err
    status, _, err = cli(capsys, "blueprint", "show", tmp_path / "missing.safetensors")
    assert status == 2 and "error: no sparse_grad blueprint at" in err
    status, _, err = cli(capsys, "blueprint", "validate", a, "--model", "nonsense")
    assert status == 2 and "--model must be 'demo' or 'package.module:callable'" in err


def test_module_entry_point_lists_its_commands():
    assert all(command in build_parser().format_help() for command in ("analyze", "blueprint"))
    run = subprocess.run([sys.executable, "-m", "sparse_grad", "blueprint"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 2 and "{show,validate,combine}" in run.stderr


def _blueprint_file(path):
    bp = Blueprint({"w": torch.rand(3), "b": torch.rand(1)}, block_size=4, shapes={"w": [10], "b": [2]},
                   dtypes={"w": "torch.float32", "b": "torch.float32"}, steps=2)
    bp.save(path)
    return bp


def _forged(tmp_path, name, edit):
    """A copy of a good blueprint file whose JSON header ``edit`` has changed."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    good = tmp_path / "good.safetensors"
    _blueprint_file(good)
    with safe_open(str(good), framework="pt") as f:
        header = json.loads(f.metadata()["sparse_grad.blueprint"])
    header = edit(header)
    path = tmp_path / f"{name}.safetensors"
    save_file(load_file(str(good)), str(path), metadata={"sparse_grad.blueprint": json.dumps(header)})
    return path


FORGERIES = {
    "no parameters": lambda h: {k: v for k, v in h.items() if k != "parameters"},
    "no block_size": lambda h: {k: v for k, v in h.items() if k != "block_size"},
    "no steps": lambda h: {k: v for k, v in h.items() if k != "steps"},
    "parameter without name": lambda h: {**h, "parameters": [{"shape": [10], "dtype": "torch.float32"}]},
    "parameter without shape": lambda h: {**h, "parameters": [{k: v for k, v in p.items() if k != "shape"}
                                                               for p in h["parameters"]]},
    "shape of strings": lambda h: {**h, "parameters": [{**p, "shape": ["10"]} for p in h["parameters"]]},
    "parameters not a list": lambda h: {**h, "parameters": "w"},
    "header a list": lambda h: [h],
    "block_size a string": lambda h: {**h, "block_size": "4"},
    "steps negative": lambda h: {**h, "steps": -1},
}


@pytest.mark.parametrize("forgery", FORGERIES)
@pytest.mark.parametrize("action", ["show", "validate", "combine"])
def test_forged_blueprint_header_is_one_error_line(tmp_path, capsys, forgery, action):
    path = _forged(tmp_path, "forged", FORGERIES[forgery])
    argv = {"show": ["blueprint", "show", path], "validate": ["blueprint", "validate", path],
            "combine": ["blueprint", "combine", tmp_path / "out.safetensors", path, path]}[action]
    status, out, err = cli(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}") and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def _garbage(tmp_path):
    dump = tmp_path / "dump.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(dump), metadata={"other.kind": "{}"})
    text = tmp_path / "notes.txt"
    text.write_text("not a blueprint\n")
    out = tmp_path / "out"
    return [
        (["analyze", "--device", "xyz"], "--device must be cpu or cuda"),
        (["analyze", "--device", "meta"], "--device must be cpu or cuda"),
        (["analyze", "--steps", "0"], "--steps must be a positive int, got 0"),
        (["analyze", "--batch", "-1"], "--batch must be a positive int"),
        (["analyze", "--block-size", "0"], "--block-size must be a positive int"),
        (["analyze", "--block-size", str(2 ** 31)], "--block-size must be at most"),
        (["analyze", "--density", "0"], r"--density must be in \(0, 1\]"),
        (["analyze", "--target-share", "1.5"], r"--target-share must be in \(0, 1\]"),
        (["analyze", "--width", "30", "--heads", "4"], "--width .30. must be a multiple of --heads .4."),
        (["analyze", "--dump", tmp_path / "missing.safetensors"], "--dump .*no such file"),
        (["analyze", "--depth", "0", "--steps", "1"], "--depth must be a positive int"),
        (["bench", "--device", "meta", "--out", out], "--device must be cpu or cuda"),
        (["bench", "--device", "xyz", "--out", out], "--device must be cpu or cuda"),
        (["bench", "--device", "cpu", "--densities", "0.5,2", "--out", out], r"--densities must be in \(0, 1\]"),
        (["bench", "--device", "cpu", "--backends", "fast", "--out", out], "--backends must be one of"),
        (["bench", "--device", "cpu", "--rounds", "0", "--out", out], "--rounds must be a positive int"),
        (["bench", "--device", "cpu", "--scale", "-1", "--out", out], "--scale must be > 0"),
        (["bench", "--device", "cpu", "--shapes", "nope", "--out", out], "--shapes: unknown shape set"),
        (["bench", "--end-to-end", "--steps", "2", "--warmup", "3", "--out", out], r"--steps \(2\) must be more"),
        (["bench", "--end-to-end", "--backends", "cpp,reference", "--out", out], "--end-to-end takes one backend"),
        (["demo", "--backend", "foo", "--quick", "--out", out], "backend must be one of"),
        (["demo", "--device", "xyz", "--quick", "--out", out], "--device must be cpu or cuda"),
        (["demo", "--quick", "--stage2-steps", "0", "--out", out], "stage2_steps must be a positive int"),
        (["demo", "--quick", "--densities", "1.5", "--out", out], r"densities must be in \(0, 1\)"),
        (["demo", "--data-selection", "--quick", "--stage1-steps", "0", "--out", out],
         "--stage1-steps must be a positive int"),
        (["demo", "--data-selection", "--backend", "cpp", "--out", out], "--backend does not apply"),
        (["demo", "--quick", "--lr-multipliers", "1", "-3", "--out", out], "lr_multipliers must be > 0"),
        (["demo", "--quick", "--lr-multipliers", "3", "3", "--out", out], "lr_multipliers has repeated values"),
        (["demo", "--data-selection", "--task", "code", "--out", out], "--task does not apply"),
        (["demo", "--data-selection", "--error-feedback", "--out", out], "--error_feedback does not apply"),
        (["demo", "--quick", "--block-size", "0", "--out", out], "block_size must be a positive int"),
        (["blueprint", "show", text], "is not a safetensors file"),
        (["blueprint", "show", dump], "not a sparse_grad blueprint"),
        (["blueprint", "combine", out / "bp.safetensors", dump, dump], "not a sparse_grad blueprint"),
        (["blueprint", "combine", out / "bp.safetensors", text], "is not a safetensors file"),
        (["blueprint", "validate", tmp_path / "missing.safetensors"], "no sparse_grad blueprint at"),
    ]


def test_garbage_invocations_are_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    import sparse_grad.cli.analyze as analyze_cli
    import sparse_grad.cli.bench as bench_cli
    import sparse_grad.cli.demo as demo_cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, name in ((analyze_cli, "record"), (bench_cli, "run_suite"), (demo_cli, "run_demo")):
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.setattr("sparse_grad.demo.data_selection.run_experiment", no_work)
    monkeypatch.setattr("sparse_grad.bench.end_to_end.run", no_work)
    for argv, message in _garbage(tmp_path):
        status, out, err = cli(capsys, *argv)
        assert status == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (argv, err)
        assert re.search(message, err), (argv, err)
    assert not (tmp_path / "out").exists()
