"""The README's first command runs examples/train_small.py: keep it working and meaningful."""
import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_small.py"


def test_train_small_runs_and_density_one_matches_adamw(capsys):
    spec = importlib.util.spec_from_file_location("train_small", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "12", "--bytes", "200000", "--densities", "1.0", "0.1",
                            "--batch", "8", "--block-size", "128"])
    out = capsys.readouterr().out
    assert "torch AdamW" in out and "SparseAdamW d=0.1" in out and "step ms" in out
    adamw, dense, sparse = results
    # Same start, same batches: density 1.0 is AdamW.
    assert math.isclose(dense["val"], adamw["val"], rel_tol=1e-4)
    for r in results:
        assert r["val"] < math.log(256) and r["step_ms"] > 0
