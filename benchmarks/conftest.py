"""Options and fixtures of the benchmark suite, and a closing table of medians with ratios.

    pytest benchmarks/ --benchmark-only                                  # CPU, --scale 0.02
    pytest benchmarks/ --benchmark-only --device cuda --scale 1.0
    pytest benchmarks/ --benchmark-only --shapes llm-400m --scale 0.125 -k optimizer_step
    pytest benchmarks/ --quick --benchmark-disable                       # CI: every case once, checked

One module per op (block_sqnorms, select_blocks, sparse_adamw_step, the full optimizer step),
parametrized by backend, dtype, block size, density and shape set (sparse_grad.bench.shapes).
``--quick`` runs every case once at a tiny scale and checks its output against the reference
backend, so the suite cannot rot unnoticed.
"""
from __future__ import annotations

import math
import platform

import pytest
import torch

from sparse_grad.bench import SHAPE_SETS, HostTime, host_time, pipelined_time, python_calls_per_step, shapes
from _report import RESULTS

QUICK_SCALE = 0.0005


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device to benchmark on (cpu or cuda)")
    parser.addoption("--scale", type=float, default=None,
                     help="fraction of the ~400M-parameter shape sets to allocate (default 0.02; 1.0 = full)")
    parser.addoption("--shapes", default=",".join(SHAPE_SETS), help="comma-separated shape sets (default: all)")
    parser.addoption("--quick", action="store_true",
                     help=f"run each case once at scale {QUICK_SCALE} and check its output (CI)")


def pytest_generate_tests(metafunc):
    if "shape_set" in metafunc.fixturenames:
        names = [n.strip() for n in metafunc.config.getoption("--shapes").split(",") if n.strip()]
        metafunc.parametrize("shape_set", names, scope="module")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def scale(request, quick):
    given = request.config.getoption("--scale")
    return given if given is not None else (QUICK_SCALE if quick else 0.02)


@pytest.fixture(scope="module")
def shape_list(shape_set, scale):
    return shapes(shape_set, scale)


@pytest.fixture
def timed(benchmark, device, quick):
    """``timed(fn)``: one call in quick mode, else the median of 7 rounds after 2 warm-ups."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_timed(fn):
        def once():
            fn()
            sync()
        rounds, warmup = (1, 0) if quick else (7, 2)
        return benchmark.pedantic(once, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return run_timed


@pytest.fixture
def step_extras(device, quick):
    """``step_extras(optimizer, kernels=None)``: what a full step costs beyond its synced median,
    as keyword arguments for ``record``: the pipelined time per step (10 steps back to back, one
    sync at the end, median of 3 runs), the host time per step with the kernels excluded (CPU:
    needs ``kernels``, the backend module, else NaN; CUDA: wall of an unsynchronized step) and
    the host time before the first kernel call (CUDA with ``kernels``), and the Python calls of
    one step. In quick mode each is taken once, so the code runs without costing time."""
    steps, runs, rounds = (1, 1, 1) if quick else (10, 3, 7)

    def measure(optimizer, kernels=None):
        extras = dict(pipelined=pipelined_time(optimizer.step, device, steps, runs, warmup=0))
        host = (host_time(optimizer.step, device, kernels, rounds, warmup=0)
                if kernels is not None or device.type == "cuda" else HostTime(math.nan, math.nan))
        extras.update(host=host.seconds, host_before_launch=host.before_launch_seconds,
                      python_calls=python_calls_per_step(optimizer))
        return extras
    return measure


def _column(value, scale: float, spec: str, width: int, suffix: str = "") -> str:
    """A column of the closing table; blank where not measured (None or NaN)."""
    if value is None or value != value:
        return f"{'':>{width}}"
    return f"{format(value if scale == 1.0 else scale * value, spec)}{suffix}".rjust(width)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"sparse_grad benchmarks — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    baselines = {(r["group"], r["name"]): r for r in RESULTS if r["name"] in ("copy", "read")}
    fused = {r["group"]: r for r in RESULTS if r["name"] == "torch AdamW fused"}
    write(f"{'group':<10} {'case':<40} {'median ms':>10} {'GB/s':>8} {'% of BW':>13} {'vs fused':>9} "
          f"{'pipelined ms':>12} {'vs fused':>9} {'host µs':>9} {'py calls':>8}")
    for r in RESULTS:
        gbps = r["ideal_bytes"] / r["median"] / 1e9
        bw = baselines.get((r["group"], r["baseline"]))
        bw_text = (f"{100 * gbps / (bw['ideal_bytes'] / bw['median'] / 1e9):>7.0f}% {r['baseline']:<5}"
                   if bw else f"{'':>13}")
        base = fused.get(r["group"])
        ratio = f"{base['median'] / r['median']:>8.2f}x" if base and r["name"].startswith(("SparseAdamW", "torch", "copy")) else f"{'':>9}"
        pipelined = r.get("pipelined")
        piped_ratio = (base["pipelined"] / pipelined if base and base.get("pipelined") and pipelined else None)
        write(f"{r['group']:<10} {r['name']:<40} {1e3 * r['median']:>10.3f} {gbps:>8.1f} {bw_text} {ratio} "
              f"{_column(pipelined, 1e3, '.3f', 12)} {_column(piped_ratio, 1.0, '.2f', 9, 'x')} "
              f"{_column(r.get('host'), 1e6, '.1f', 9)} {_column(r.get('python_calls'), 1.0, 'd', 8)}".rstrip())
    if any("pipelined" in r for r in RESULTS):
        write("median ms: each call timed alone, synchronized; pipelined ms: per step of 10 steps back to back, one "
              "sync at the end;")
        write("host µs: host time per step, kernels excluded; py calls: Python calls of one step "
              "(sparse_grad.bench.timing)")
