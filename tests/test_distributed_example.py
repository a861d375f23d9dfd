"""examples/fsdp2_finetune.py under torchrun on CPU (gloo): it trains, saves a checkpoint at world
size 2, and a resume at world size 3 continues like the uninterrupted run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp2_finetune.py"
TINY = ["--width", "32", "--layers", "1", "--context", "16", "--batch", "6", "--bytes", "50000",
        "--block-size", "64", "--log-every", "1", "--state-layout", "compact", "--reselect-every", "2"]


def torchrun(world: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={world}", str(EXAMPLE), *TINY, *args],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+): loss ([0-9.]+)", stdout)}


def test_fsdp2_example_trains_saves_and_resumes_at_another_world_size(tmp_path):
    whole = torchrun(2, "--steps", "8")
    first = torchrun(2, "--steps", "5", "--save", str(tmp_path / "ckpt"))
    resumed = torchrun(3, "--steps", "3", "--resume", str(tmp_path / "ckpt"))
    assert "done: world size 2" in first and "saved to" in first and "done: world size 3" in resumed
    assert sorted(losses(resumed)) == [6, 7, 8]
    reference = losses(whole)
    assert reference[8] < reference[1]  # it learns
    for step, loss in {**losses(first), **losses(resumed)}.items():
        assert abs(loss - reference[step]) < 1e-3, (step, loss, reference[step])
