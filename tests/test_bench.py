"""sparse_grad.bench and ``python -m sparse_grad bench``: shape sets, timing, derived columns, reports."""
import csv
import json
import math
import types

import pytest
import torch

from _models import one_thread

from sparse_grad import SparseAdamW, backends
from sparse_grad.bench import (Result, host_time, ideal_bytes, kernels_timed, make_params, median_time, pipelined_time,
                               python_calls, python_calls_per_step, run, shapes)
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
    assert ideal_bytes(1000, 0.01, reselect_every=10) == pytest.approx(400 + 280)  # one norm pass in 10 steps
    assert ideal_bytes(1000, 1.0, reselect_every=10) == 28_000


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
    assert math.isnan(sparse.speedup_pipelined)  # not timed pipelined: no ratio made up


def test_pipelined_speedup_comes_from_the_pipelined_times():
    rows = [Result("s", "copy", None, None, 2.0, 800.0, seconds_pipelined=1.0),
            Result("s", "torch AdamW fused", None, None, 4.0, 2800.0, seconds_pipelined=3.0),
            Result("s", "SparseAdamW cpp", "cpp", 0.05, 0.5, 540.0, seconds_pipelined=0.25)]
    suite._derive(rows)
    assert [r.speedup_pipelined for r in rows] == [3.0, 1.0, 12.0]
    assert [r.speedup for r in rows] == [2.0, 1.0, 8.0]  # the synced ratios stay as they were


def cpu_backends():
    return [b for b in ("reference", "cpp") if backends.unavailable_reason(b, torch.device("cpu")) is None]


def test_run_times_every_case_once_per_backend_and_density():
    progress = []
    with one_thread():
        results, info = run("many-small", "cpu", scale=0.001, densities=[1.0, 0.05], rounds=1, warmup=0,
                            progress=lambda done, total, what: progress.append((done, total)),
                            pipeline_steps=2, pipeline_runs=1)
    names = [(r.case, r.density) for r in results]
    expected = ["copy", "torch AdamW foreach", "torch AdamW fused"]
    assert names == [(c, None) for c in expected] + [(f"SparseAdamW {b}", d) for b in cpu_backends()
                                                     for d in (1.0, 0.05)]
    assert progress[-1] == (len(results), len(results)) and progress[0] == (0, len(results))
    assert info["tensors"] == 1000 and info["params"] == numel(shapes("many-small", 0.001))
    assert all(r.seconds > 0 and r.gbps > 0 for r in results)
    assert info["pipeline_steps"] == 2 and info["pipeline_runs"] == 1


def test_run_fills_pipelined_host_and_python_call_columns_where_they_apply():
    with one_thread():
        results, _ = run("one-flat", "cpu", scale=0.005, densities=[1.0, 0.05], rounds=3, warmup=1,
                         pipeline_steps=3, pipeline_runs=2)
    by_case = {(r.case, r.density): r for r in results}
    assert all(math.isfinite(r.seconds_pipelined) and r.seconds_pipelined > 0 for r in results)
    assert all(math.isfinite(r.speedup_pipelined) and r.speedup_pipelined > 0 for r in results)
    assert all(math.isnan(r.host_before_launch_seconds) for r in results)  # CUDA only
    copy = by_case["copy", None]
    assert math.isnan(copy.host_seconds) and copy.python_calls is None  # not an optimizer step
    for variant in ("foreach", "fused"):  # torch's kernels cannot be told apart from its host work on CPU
        torch_row = by_case[f"torch AdamW {variant}", None]
        assert math.isnan(torch_row.host_seconds)
        assert isinstance(torch_row.python_calls, int) and torch_row.python_calls > 0
    sparse = [r for r in results if r.case.startswith("SparseAdamW")]
    assert len(sparse) == 2 * len(cpu_backends())
    for r in sparse:
        assert math.isfinite(r.host_seconds) and r.host_seconds > 0
        assert isinstance(r.python_calls, int) and r.python_calls > 0
    for density in (1.0, 0.05):  # 2M params through the reference's torch ops: kernels dominate by far
        reference = by_case["SparseAdamW reference", density]
        assert reference.host_seconds < reference.seconds and reference.host_seconds < reference.seconds_pipelined


def test_run_rejects_what_it_cannot_time():
    with pytest.raises(ValueError, match="triton is timed on CUDA only"):
        run("one-flat", "cpu", scale=1e-6, backend_names=["triton"])
    with pytest.raises(ValueError, match="backends must be one of"):
        run("one-flat", "cpu", scale=1e-6, backend_names=["fast"])
    with pytest.raises(ValueError, match="densities must be in"):
        run("one-flat", "cpu", scale=1e-6, densities=[0.0])
    with pytest.raises(ValueError, match="warmup must be an int"):
        run("one-flat", "cpu", scale=1e-6, warmup=-1)
    with pytest.raises(ValueError, match="pipeline_steps must be a positive int"):
        run("one-flat", "cpu", scale=1e-6, pipeline_steps=0)
    with pytest.raises(TypeError, match="pipeline_runs must be a positive int"):
        run("one-flat", "cpu", scale=1e-6, pipeline_runs=1.5)


def test_cli_bench_prints_and_writes_table_csv_json_png(tmp_path, capsys):
    with one_thread():
        status = main(["bench", "--device", "cpu", "--shapes", "one-flat,many-small", "--scale", "0.0005",
                       "--densities", "1,0.05", "--backends", "reference", "--rounds", "1", "--warmup", "0",
                       "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 0
    assert "SparseAdamW reference" in out and "vs fused" in out and "1000 tensors" in out
    header = next(line for line in out.splitlines() if line.startswith("shapes"))
    for column in ("synced ms", "pipelined ms", "pipelined vs fused", "host µs", "py calls"):
        assert column in header
    assert "pre-launch µs" not in header  # measured on CUDA only
    copy_row = next(line for line in out.splitlines() if " copy " in line)
    assert copy_row.split()[-2:] == ["-", "-"]  # no host time, no Python calls: not an optimizer step
    assert "5/5 bench one-flat" in err and err.rstrip().endswith("done")  # 3 baselines + 2 densities, to the end
    assert "\r" not in err  # not a terminal: whole lines
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 2 * 5
    copy_json = data["results"][0]
    assert copy_json["case"] == "copy" and copy_json["host_seconds"] is None and copy_json["python_calls"] is None
    assert all(r["python_calls"] > 0 and r["host_seconds"] > 0 for r in data["results"]
               if r["case"].startswith("SparseAdamW"))
    meta = data["meta"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["date"] and meta["cpu"]
    assert "--shapes one-flat,many-small --scale 0.0005" in meta["command"]
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["case"] == "copy" and rows[0]["torch_version"] == torch.__version__
    fused = [r for r in rows if r["case"] == "torch AdamW fused"]
    assert [float(r["speedup"]) for r in fused] == [1.0, 1.0]
    assert [float(r["speedup_pipelined"]) for r in fused] == [1.0, 1.0]
    for column in ("seconds_pipelined", "host_seconds", "host_before_launch_seconds", "python_calls"):
        assert column in rows[0]
    sparse = [r for r in rows if r["case"] == "SparseAdamW reference"]
    assert all(float(r["seconds_pipelined"]) > 0 and float(r["host_seconds"]) > 0 and int(r["python_calls"]) > 0
               for r in sparse)
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


class FakeClock:
    """``time.perf_counter`` for the timing module that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def fake_backend(clock):
    """A module with the kernel entry points (backends.KERNEL_NAMES): each advances the clock by a known amount;
    select_blocks calls block_sqnorms through the module, as a kernel might."""
    module = types.ModuleType("fake_backend")

    def block_sqnorms(tensors, block_size):
        clock.advance(5.0)
        return ("norms", tensors, block_size)

    def select_blocks(scores, sizes, ks):
        clock.advance(1.0)
        module.block_sqnorms([scores], 1)  # nested: its 5 s are already inside these 3 + 5
        clock.advance(2.0)
        return ("ids", scores, sizes, ks)

    def sparse_adamw_step(*args, **kwargs):
        clock.advance(4.0)
        return None

    module.block_sqnorms, module.select_blocks, module.sparse_adamw_step = block_sqnorms, select_blocks, sparse_adamw_step
    module.sparse_sgd_step = module.sparse_lion_step = sparse_adamw_step  # the other update rules' entry points
    return module


def test_pipelined_time_runs_steps_back_to_back_and_takes_the_median_per_step(monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 16.0, 20.0, 50.0])  # runs of 3, 6 and 30 s, 3 steps each
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert pipelined_time(lambda: calls.append(1), torch.device("cpu"), steps=3, runs=3, warmup=1) == 2.0
    assert len(calls) == 1 + 3 * 3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps must be a positive int"), (dict(runs=True), TypeError, "runs must be"),
    (dict(warmup=-1), ValueError, "warmup must be"), (dict(device="cpu"), TypeError, "device must be a torch.device")])
def test_pipelined_time_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pipelined_time(lambda: None, **{"device": torch.device("cpu"), **kwargs})


def test_host_time_on_cpu_is_wall_minus_the_time_inside_the_kernels(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    module = fake_backend(clock)

    def step():  # 1 + 2 + 0.5 s of host work around 5 + (1 + 5 + 2) + 4 s of kernels
        clock.advance(1.0)
        module.block_sqnorms([], 4)
        clock.advance(2.0)
        module.select_blocks("scores", [3], [1])
        module.sparse_adamw_step(1, 2, lr=3)
        clock.advance(0.5)

    host = host_time(step, torch.device("cpu"), module, rounds=3, warmup=1)
    assert host.seconds == 3.5
    assert math.isnan(host.before_launch_seconds)  # CUDA only


def test_kernels_timed_forwards_arguments_and_results_and_counts_calls():
    clock = FakeClock()
    module = fake_backend(clock)
    originals = (module.block_sqnorms, module.select_blocks, module.sparse_adamw_step)
    with kernels_timed(module) as kernel_clock:
        assert module.block_sqnorms is not originals[0]
        assert module.block_sqnorms(["t"], block_size=7) == ("norms", ["t"], 7)
        assert module.select_blocks("s", [2], ks=[1]) == ("ids", "s", [2], [1])
        assert module.sparse_adamw_step(1, flag=True) is None
    assert kernel_clock.calls == 4  # the nested block_sqnorms counted as a call
    assert (module.block_sqnorms, module.select_blocks, module.sparse_adamw_step) == originals


def test_kernels_timed_restores_the_originals_after_an_exception():
    module = fake_backend(FakeClock())
    originals = (module.block_sqnorms, module.select_blocks, module.sparse_adamw_step)
    with pytest.raises(KeyError, match="inside"):
        with kernels_timed(module):
            raise KeyError("inside")
    assert (module.block_sqnorms, module.select_blocks, module.sparse_adamw_step) == originals


def test_kernels_timed_rejects_a_module_without_the_entry_points():
    with pytest.raises(ValueError, match="no kernel entry point .*sparse_adamw_step"):
        with kernels_timed(types.ModuleType("empty")):
            pass
    with pytest.raises(TypeError, match="module must be a backend module"):
        with kernels_timed("reference"):
            pass


def test_host_time_restores_the_backend_after_a_step_that_raises(monkeypatch):
    reference = backends.get("reference")

    def broken_update(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(reference, "sparse_adamw_step", broken_update)
    before = {name: getattr(reference, name) for name in timing.kernel_names()}
    opt = SparseAdamW(make_params([(300,), (50, 7)], "cpu"), lr=1e-3, density=0.5, block_size=64, backend="reference")
    with pytest.raises(RuntimeError, match="kernel failed"):
        host_time(opt.step, torch.device("cpu"), reference, rounds=2, warmup=0)
    assert {name: getattr(reference, name) for name in timing.kernel_names()} == before


def test_host_time_of_a_real_step_is_positive_and_below_its_wall_time():
    params = make_params(shapes("one-flat", 0.005), "cpu")  # 2M params: the reference's kernels dominate
    opt = SparseAdamW(params, lr=1e-3, density=0.2, block_size=4096, backend="reference")
    with one_thread():
        host = host_time(opt.step, torch.device("cpu"), backends.get("reference"), rounds=3, warmup=1)
        wall = median_time(opt.step, torch.device("cpu"), rounds=3, warmup=0)
    assert 0 < host.seconds < wall


def test_host_time_on_cpu_needs_the_kernel_module():
    with pytest.raises(ValueError, match="module: on CPU"):
        host_time(lambda: None, torch.device("cpu"))


def test_python_calls_counts_each_call():
    def inner():
        pass

    def once():
        inner()

    def twice():
        inner()
        inner()
    assert python_calls(twice) - python_calls(once) == 1
    with pytest.raises(TypeError, match="fn must be callable"):
        python_calls(3)


@pytest.mark.parametrize("backend", cpu_backends())
def test_python_calls_per_step_is_a_positive_int_and_the_same_every_step(backend):
    opt = SparseAdamW(make_params([(300,), (50, 7), (9,)], "cpu"), lr=1e-3, density=0.5, block_size=64,
                      backend=backend)
    first, second = python_calls_per_step(opt), python_calls_per_step(opt)
    assert isinstance(first, int) and first > 0 and first == second
    # the count sees the optimizer's work, not a constant: a score hook adds its own call
    opt.register_score_hook(lambda *args: None)
    assert python_calls_per_step(opt) > first
    with pytest.raises(TypeError, match="opt must be an optimizer"):
        python_calls_per_step(object())


def test_table_marks_unmeasured_values_and_shows_pre_launch_only_when_measured():
    from sparse_grad.bench.report import table
    rows = [Result("s", "copy", None, None, 2e-3, 800.0, seconds_pipelined=1e-3),
            Result("s", "SparseAdamW cuda", "cuda", 0.05, 5e-4, 540.0, seconds_pipelined=4e-4, host_seconds=1.5e-4,
                   python_calls=321)]
    text = table(rows)
    assert "pre-launch" not in text and "nan" not in text
    assert text.splitlines()[2].split()[-2:] == ["150.0", "321"]
    rows[1].host_before_launch_seconds = 2.5e-5
    with_launch = table(rows).splitlines()
    assert "pre-launch µs" in with_launch[0] and with_launch[2].split()[-2:] == ["25.0", "321"]
    assert with_launch[1].split()[-3:] == ["-", "-", "-"]


def benchmark_script(name: str):
    """benchmarks/<name>.py imported as a module (the folder is not a package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_ops_script_runs_on_cpu_and_checks_every_selection(tmp_path):
    """benchmarks/gpu_ops.py (the per-op GPU timings) at a tiny size on CPU: its cases, its
    selection check against the reference, and its table cannot rot between GPU sessions."""
    import json
    gpu_ops = benchmark_script("gpu_ops")
    assert gpu_ops.phase_of("_block_sqnorms_kernel") == "norm"
    assert gpu_ops.phase_of("_histogram_kernel") == "select"
    assert gpu_ops.phase_of("void sparse_adamw_kernel<float>") == "update"
    assert gpu_ops.main(["--device", "cpu", "--scale", "0.0005", "--backends", "cpp", "--rounds", "1",
                         "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_ops.json").read_text())
    steps = [r for r in rows if r["case"] == "SparseAdamW"]
    assert [(r["density"], r["reselect_every"]) for r in steps] == [(1.0, 1), (0.05, 1), (0.01, 1), (0.05, 10), (0.01, 10)]
    assert all(r["synced"] > 0 and 0 < r["pct_ideal"] for r in steps)
    assert len([r for r in rows if r["case"] == "select_only"]) == 4
    table = (tmp_path / "gpu_ops.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| torch AdamW fused |" in table


def test_gpu_ops_times_every_launch_sequence_of_the_triton_selection(triton_case):
    """The selection-alone rows on the Triton backend (under the interpreter here): each tile and
    each forced launch sequence selects the reference's blocks (checked inside), and each is a
    row of its own."""
    gpu_ops = benchmark_script("gpu_ops")
    device = torch.device(triton_case[0])
    rows = gpu_ops.select_rows("triton", device, 0.0005, [None, 16], rounds=1)
    per_case = 2 + len(gpu_ops.SELECT_VARIANTS) - 1  # two tiles, the forced sequences at the default
    assert len(rows) == 4 * per_case
    assert {(r["tile"], r["variant"]) for r in rows} == {(None, ""), (16, "")} | {(None, v) for v in gpu_ops.SELECT_VARIANTS if v}
    assert all(r["synced"] > 0 for r in rows)


def test_host_time_script_stubs_the_kernels_and_measures_the_host_path(monkeypatch):
    """benchmarks/host_time.py --stub-kernels: the step runs its host path with no update (the
    params stay as they were) and the first norms and selection kept; then it is measured."""
    script = benchmark_script("host_time")
    module = backends.get("reference")
    for name in script.KERNELS:  # put back after the test
        monkeypatch.setattr(module, name, getattr(module, name))
    kept = script.stub_kernels("reference")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (13, 4, 9)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt = SparseAdamW(params, lr=0.1, density=0.5, block_size=4, backend="reference")
    row = script.measure(opt, torch.device("cpu"), "reference", rounds=3)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert set(kept) == {"block_sqnorms", "select_blocks"} and kept["select_blocks"].numel() == 4
    assert row["python_calls"] > 50 and 0 < row["pre_launch_us"] <= row["host_us"]


def test_end_to_end_cli_runs_every_case_and_sparse_backward_changes_no_loss(tmp_path, capsys):
    import json

    from sparse_grad.cli import main
    status = main(["bench", "--end-to-end", "--device", "cpu", "--size", "quick", "--steps", "4", "--warmup", "1",
                   "--densities", "0.05", "--backends", "reference", "--threads", "1", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "end_to_end.json").read_text())
    results = {r["case"]: r for r in saved["results"]}
    assert saved["command"].startswith("python -m sparse_grad bench --end-to-end --device cpu --size quick")
    assert list(results)[0] == "AdamW (fused)" and len(results) in (11, 12)  # 12 with peft's LoRA
    for name, r in results.items():
        assert r["median_seconds"] > 0 and r["state_bytes"] > 0 and name in out
        if " +sparse_backward" in name:  # the same parameters: the same losses
            plain = results[name.split(" +sparse_backward")[0]]
            assert abs(r["val_loss"] - plain["val_loss"]) <= 1e-5 * plain["val_loss"]
            assert abs(r["train_loss"] - plain["train_loss"]) <= 1e-5 * plain["train_loss"]
    dense, compact = results["d=0.05 R=10 dense"], results["d=0.05 R=10 compact"]
    assert compact["state_bytes"] < 0.6 * dense["state_bytes"]  # dense: + one int32 step count per block
    assert dense["state_bytes"] <= 1.01 * results["AdamW (fused)"]["state_bytes"]
    # compact grads: the weights' gradients ∝ density on the last step (between reselections)
    for layout in ("dense", "compact"):
        full = results[f"d=0.05 R=10 {layout} +sparse_backward"]["state_bytes"]
        assert results[f"d=0.05 R=10 {layout} +sparse_backward compact grads"]["state_bytes"] < full


def test_end_to_end_gpt2_medium_preset_has_gpt2_mediums_shape():
    """The GPU preset the end-to-end targets name: GPT-2 medium's width, depth, heads and context
    (byte vocabulary: 303.9M parameters, counted on the meta device without allocating)."""
    from sparse_grad.bench.end_to_end import model_config
    from sparse_grad.demo.model import TinyLM

    cfg = model_config("gpt2-medium")
    assert (cfg.width, cfg.layers, cfg.heads, cfg.context) == (1024, 24, 16, 1024)
    with torch.device("meta"):
        model = TinyLM(cfg.context, cfg.width, cfg.layers, cfg.heads)
    # 24 x (12 w^2 + 13 w) + 1024 positions x w + 256 bytes x w (in and out) + 256 + 2 w
    w = 1024
    assert sum(p.numel() for p in model.parameters()) == 24 * (12 * w * w + 13 * w) + 1024 * w + 2 * 256 * w + 256 + 2 * w
    assert model_config("medium").width == 256
    with pytest.raises(ValueError, match="size must be one of"):
        model_config("gpt2-xl")
