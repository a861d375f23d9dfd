"""Options for the benchmark suite and a closing table of medians with ratios to the baselines.

    pytest benchmarks/ --benchmark-only                       # CPU, small shapes
    pytest benchmarks/ --benchmark-only --device cuda --scale 1.0
    pytest benchmarks/ --benchmark-only --scale 0.125 -k "one-flat or fifty"   # 50M params
"""
from __future__ import annotations

import platform

import pytest
import torch

from _report import RESULTS


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device to benchmark on (cpu or cuda)")
    parser.addoption("--scale", type=float, default=0.02,
                     help="fraction of the 400M-parameter shape sets to allocate (1.0 = full size)")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def scale(request):
    return request.config.getoption("--scale")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"sparse_grad benchmarks — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    baselines = {(r["group"], r["name"]): r for r in RESULTS if r["name"] in ("copy", "read")}
    fused = {r["group"]: r for r in RESULTS if r["name"] == "torch AdamW fused"}
    write(f"{'group':<9} {'case':<34} {'median ms':>10} {'GB/s':>8} {'% of BW':>13} {'vs fused':>9}")
    for r in RESULTS:
        gbps = r["ideal_bytes"] / r["median"] / 1e9
        bw = baselines.get((r["group"], r["baseline"]))
        bw_text = (f"{100 * gbps / (bw['ideal_bytes'] / bw['median'] / 1e9):>7.0f}% {r['baseline']:<5}"
                   if bw else f"{'':>13}")
        base = fused.get(r["group"])
        ratio = f"{base['median'] / r['median']:>8.2f}x" if base and r["baseline"] == "copy" else f"{'':>9}"
        write(f"{r['group']:<9} {r['name']:<34} {1e3 * r['median']:>10.3f} {gbps:>8.1f} {bw_text} {ratio}")
