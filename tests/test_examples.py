"""The README's framework examples run as a newcomer would run them (CPU, seconds) and train."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_hf_trainer_example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("hf_trainer.py")
    found = re.search(r"(\d+) steps, eval loss ([\d.]+) → ([\d.]+), gradient Gini ([\d.]+)", out)
    assert found, out[-2000:]
    assert int(found[1]) > 0 and float(found[3]) < float(found[2])  # it learned
    assert "'sparse_grad/cpr'" in out  # the callback's figures reached the Trainer's printed log


def test_lightning_example():
    pytest.importorskip("lightning")
    out = run_example("lightning_trainer.py")
    losses = [float(v) for v in re.findall(r"'val_loss': ([\d.]+)", out)]
    assert len(losses) >= 2 and losses[-1] < losses[0], out[-2000:]  # it learned
    assert re.search(r"'grad_gini': [\d.]+, 'grad_top_share': [\d.]+, 'mask_churn'", out)
    assert re.search(r"\d+ steps, val loss [\d.]+", out)
