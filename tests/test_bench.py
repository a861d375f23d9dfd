"""sparse_grad.bench and ``python -m sparse_grad bench``: shape sets, timing, derived columns, reports."""
import csv
import json
import math

import pytest
import torch

from _models import one_thread

from sparse_grad import backends
from sparse_grad.bench import Result, ideal_bytes, make_params, median_time, run, shapes
from sparse_grad.bench import suite, timing
from sparse_grad.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def numel(shape_list):
    return sum(math.prod(s) for s in shape_list)


def test_shape_sets_at_full_size():
    llm = shapes("llm-400m")
    assert len(llm) == 192 and 400e6 <= numel(llm) <= 405e6
    assert sum(len(s) == 1 for s in llm) == 96  # two norms' weights and biases per layer
    assert shapes("one-flat") == [(400_000_000,)]
    small = shapes("many-small")
    assert len(small) == 1000 and all(1024 <= s[0] <= 65536 for s in small)
    assert small == shapes("many-small")  # fixed seed: the same sizes every run


def test_scale_shrinks_tensors_not_their_number():
    for name in ("llm-400m", "many-small"):
        full, small = shapes(name), shapes(name, 0.01)
        assert len(small) == len(full) and numel(small) < 0.05 * numel(full)
    assert shapes("one-flat", 1e-9) == [(1,)]


@pytest.mark.parametrize("name, scale, error, match", [
    ("llm", 1.0, ValueError, "shapes must be one of"), (3, 1.0, TypeError, "shapes must be a str"),
    ("one-flat", 0.0, ValueError, "scale must be in"), ("one-flat", 1.5, ValueError, "scale must be in"),
    ("one-flat", True, TypeError, "scale must be a real")])
def test_bad_shape_set_arguments(name, scale, error, match):
    with pytest.raises(error, match=match):
        shapes(name, scale)


def test_ideal_bytes_follow_design_section_7():
    assert ideal_bytes(1000, 1.0) == 28_000  # no norm pass at density 1
    assert ideal_bytes(1000, 0.05) == pytest.approx(4000 + 1400)
    assert ideal_bytes(1000, 0.01) == pytest.approx(4000 + 280)


def test_median_time_counts_warmup_and_takes_the_median(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 20.5])  # runs of 1, 3 and 0.5 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert median_time(lambda: calls.append(1), torch.device("cpu"), rounds=3, warmup=2) == 1.0
    assert len(calls) == 5


def test_derived_columns():
    rows = [Result("s", "copy", None, None, 2.0, 800.0), Result("s", "torch AdamW fused", None, None, 4.0, 2800.0),
            Result("s", "SparseAdamW cpp", "cpp", 0.05, 0.5, ideal_bytes(100, 0.05))]
    suite._derive(rows)
    copy, fused, sparse = rows
    assert copy.pct_ideal == 100 and fused.speedup == 1.0 and sparse.speedup == 8.0
    assert sparse.gbps == pytest.approx(540 / 0.5 / 1e9)
    assert sparse.pct_ideal == pytest.approx(100 * (540 / 400) / 0.5)  # copy moves 400 B/s
    assert fused.pct_ideal == pytest.approx(100 * 7 / 4)


def cpu_backends():
    return [b for b in ("reference", "cpp") if backends.unavailable_reason(b, torch.device("cpu")) is None]


def test_run_times_every_case_once_per_backend_and_density():
    progress = []
    with one_thread():
        results, info = run("many-small", "cpu", scale=0.001, densities=[1.0, 0.05], rounds=1, warmup=0,
                            progress=lambda done, total, what: progress.append((done, total)))
    names = [(r.case, r.density) for r in results]
    expected = ["copy", "torch AdamW foreach", "torch AdamW fused"]
    assert names == [(c, None) for c in expected] + [(f"SparseAdamW {b}", d) for b in cpu_backends()
                                                     for d in (1.0, 0.05)]
    assert progress[-1] == (len(results), len(results)) and progress[0] == (0, len(results))
    assert info["tensors"] == 1000 and info["params"] == numel(shapes("many-small", 0.001))
    assert all(r.seconds > 0 and r.gbps > 0 for r in results)


def test_run_rejects_what_it_cannot_time():
    with pytest.raises(ValueError, match="triton is timed on CUDA only"):
        run("one-flat", "cpu", scale=1e-6, backend_names=["triton"])
    with pytest.raises(ValueError, match="backends must be one of"):
        run("one-flat", "cpu", scale=1e-6, backend_names=["fast"])
    with pytest.raises(ValueError, match="densities must be in"):
        run("one-flat", "cpu", scale=1e-6, densities=[0.0])
    with pytest.raises(ValueError, match="warmup must be an int"):
        run("one-flat", "cpu", scale=1e-6, warmup=-1)


def test_cli_bench_prints_and_writes_table_csv_json_png(tmp_path, capsys):
    with one_thread():
        status = main(["bench", "--device", "cpu", "--shapes", "one-flat,many-small", "--scale", "0.0005",
                       "--densities", "1,0.05", "--backends", "reference", "--rounds", "1", "--warmup", "0",
                       "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 0
    assert "SparseAdamW reference" in out and "vs fused" in out and "1000 tensors" in out
    assert "5/5 done" in err  # the progress bar reached the end: 3 baselines + 2 densities
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 2 * 5
    meta = data["meta"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["date"] and meta["cpu"]
    assert "--shapes one-flat,many-small --scale 0.0005" in meta["command"]
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["case"] == "copy" and rows[0]["torch_version"] == torch.__version__
    fused = [r for r in rows if r["case"] == "torch AdamW fused"]
    assert [float(r["speedup"]) for r in fused] == [1.0, 1.0]
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("argv, match", [
    (["--shapes", "tiny"], "unknown shape set 'tiny'"), (["--densities", "a,b"], "--densities must be"),
    (["--backends", "triton"], "triton is timed on CUDA only"), (["--densities", ","], "--densities is empty")])
def test_cli_bench_bad_arguments(tmp_path, capsys, argv, match):
    status = main(["bench", "--device", "cpu", "--scale", "1e-6", "--out", str(tmp_path), *argv])
    assert status == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_make_params_is_seeded_and_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    a, b = make_params([(5, 3), (7,)], "cpu"), make_params([(5, 3), (7,)], "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) and torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    assert not torch.equal(make_params([(7,)], "cpu", seed=1)[0], make_params([(7,)], "cpu", seed=2)[0])
