"""``python -m sparse_grad analyze`` and ``python -m sparse_grad blueprint {show,validate,combine}``."""
import subprocess
import sys

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
