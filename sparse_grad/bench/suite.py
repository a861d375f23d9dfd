"""One benchmark run: a plain copy (the bandwidth), torch AdamW foreach and fused, and a full
``SparseAdamW.step`` per backend and density, on one shape set; ideal bytes per docs/design.md §7.

Each case is timed synchronized per step and pipelined (steps back to back); the optimizer
steps also get their host time per step and their Python calls per step (``timing``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .. import SparseAdamW, backends
from .._checks import density as check_density
from .._checks import positive_int
from .shapes import shapes as shape_set
from .timing import host_time, median_time, pipelined_time, python_calls_per_step

__all__ = ["Result", "ideal_bytes", "make_params", "plan_cases", "run"]


def ideal_bytes(num_params: int, density: float, reselect_every: int = 1) -> float:
    """Bytes a SparseAdamW step must move with fp32 params, grads and state: 4 B/param to read
    every grad for the norm pass (skipped at density 1; once per ``reselect_every`` steps) +
    28 B/param·density for the update (read param, grad, two moments; write param, two moments)."""
    return (0 if density == 1.0 else 4 * num_params / reselect_every) + 28 * num_params * density


@dataclass
class Result:
    shapes: str
    case: str  # "copy", "torch AdamW foreach", "torch AdamW fused" or "SparseAdamW <backend>"
    backend: str | None
    density: float | None
    seconds: float  # median of steps timed alone, synchronized ("synced")
    ideal_bytes: float
    gbps: float = math.nan  # ideal bytes per second (synced)
    pct_ideal: float = math.nan  # time the ideal bytes take at copy bandwidth / time taken (synced)
    speedup: float = math.nan  # torch AdamW fused's time / time taken (synced)
    seconds_pipelined: float = math.nan  # per step, steps back to back with one sync at the end
    host_seconds: float = math.nan  # host time per step, kernels excluded (NaN: copy; torch AdamW on CPU)
    host_before_launch_seconds: float = math.nan  # host time before the first kernel call (CUDA SparseAdamW)
    python_calls: int | None = None  # Python calls of one steady-state step (None: copy)
    speedup_pipelined: float = math.nan  # torch AdamW fused's time / time taken (pipelined)

    def as_dict(self) -> dict:
        return asdict(self)


def make_params(shapes: Sequence[tuple[int, ...]], device: torch.device | str, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 params with fp32 grads whose scale differs per tensor (a realistic selection); the
    same values for the same ``seed``, without touching the caller's random state."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        params = []
        for shape in shapes:
            p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
            p.grad = torch.randn(shape, device=device) * torch.rand(()).item()
            params.append(p)
    return params


def available_backends(device: torch.device) -> list[str]:
    """Backends timed on ``device``: Triton only on CUDA (on CPU it is an interpreter)."""
    return [b for b in backends.BACKENDS[1:] if backends.unavailable_reason(b, device) is None
            and not (b == "triton" and device.type != "cuda")]


def check_backends(names: Sequence[str], device: torch.device) -> list[str]:
    """``names`` if every one can be timed on ``device``; else a ValueError that says why."""
    for name in names:
        backends.check_backend(name, "backends")
        if name == "auto":
            raise ValueError("backends: name concrete backends, not 'auto'")
        if name == "triton" and device.type != "cuda":
            raise ValueError("backends: triton is timed on CUDA only (on CPU it runs in Triton's interpreter)")
        reason = backends.unavailable_reason(name, device)
        if reason is not None:
            raise ValueError(f"backends: {name} cannot run on {device}: {reason}")
    return list(names)


def plan_cases(backend_names: Sequence[str], densities: Sequence[float]) -> list[tuple[str, str | None, float | None]]:
    """(case, backend, density) in the order they run: baselines first."""
    cases = [("copy", None, None), ("torch AdamW foreach", None, None), ("torch AdamW fused", None, None)]
    return cases + [(f"SparseAdamW {b}", b, d) for b in backend_names for d in densities]


@dataclass
class _Case:
    """What one case runs: ``step`` (its state created already), the optimizer behind it
    (None for the copy), and the backend module whose kernels the step calls (None unless
    SparseAdamW)."""
    step: Callable[[], object]
    optimizer: torch.optim.Optimizer | None = None
    kernels: object = None


def _make_case(case: str, backend: str | None, density: float | None, params, block_size: int) -> _Case:
    if case == "copy":
        src = torch.cat([p.detach().reshape(-1) for p in params])
        dst = torch.empty_like(src)
        return _Case(lambda: dst.copy_(src))
    if case.startswith("torch AdamW"):
        opt = torch.optim.AdamW(params, lr=1e-5, **{case.split()[-1]: True})
        kernels = None
    else:
        opt = SparseAdamW(params, lr=1e-5, density=density, block_size=block_size, backend=backend)
        kernels = backends.get(backend)
    opt.step()  # the state, outside the timing
    return _Case(opt.step, opt, kernels)


def _measure(result: Result, case: _Case, device: torch.device, rounds: int, warmup: int,
             pipeline_steps: int, pipeline_runs: int) -> None:
    """Time ``case`` synced (with the warm-up), then pipelined, then its host side, into ``result``.

    Host time needs the kernels told apart from the host: on CPU by wrapping SparseAdamW's
    kernel entry points, which torch's AdamW does not have (its host time stays NaN there).
    """
    result.seconds = median_time(case.step, device, rounds, warmup)
    result.seconds_pipelined = pipelined_time(case.step, device, pipeline_steps, pipeline_runs, warmup=0)
    if case.optimizer is None:
        return
    if case.kernels is not None or device.type == "cuda":
        host = host_time(case.step, device, case.kernels, rounds, warmup=0)
        result.host_seconds = host.seconds
        result.host_before_launch_seconds = host.before_launch_seconds
    result.python_calls = python_calls_per_step(case.optimizer)


def run(shapes: str, device: torch.device | str, scale: float = 1.0, densities: Sequence[float] = (1.0, 0.2, 0.05, 0.01),
        backend_names: Sequence[str] | None = None, block_size: int = 4096, rounds: int = 7, warmup: int = 2,
        progress: Callable[[int, int, str], None] | None = None, pipeline_steps: int = 10,
        pipeline_runs: int = 3) -> tuple[list[Result], dict]:
    """Time every case on ``shapes`` at ``scale``; returns the results and a description of the
    run (parameter and tensor counts). ``progress(done, total, case)`` is called before each case.

    Per case: the median of ``rounds`` synced steps after ``warmup``; the median over
    ``pipeline_runs`` runs of ``pipeline_steps`` steps back to back; for the optimizers the
    median host time of ``rounds`` steps and the Python calls of one step."""
    device = torch.device(device)
    densities = [check_density(d, "densities") for d in densities]
    block_size = positive_int(block_size, "block_size")
    rounds = positive_int(rounds, "rounds")
    pipeline_steps = positive_int(pipeline_steps, "pipeline_steps")
    pipeline_runs = positive_int(pipeline_runs, "pipeline_runs")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    names = available_backends(device) if backend_names is None else check_backends(backend_names, device)
    params = make_params(shape_set(shapes, scale), device)
    num_params = sum(p.numel() for p in params)
    cases = plan_cases(names, densities)
    results = []
    for i, (case, backend, density) in enumerate(cases):
        if progress is not None:
            progress(i, len(cases), case if density is None else f"{case} d={density:g}")
        moved = 8 * num_params if case == "copy" else ideal_bytes(num_params, 1.0 if density is None else density)
        result = Result(shapes, case, backend, density, math.nan, moved)
        _measure(result, _make_case(case, backend, density, params, block_size), device, rounds, warmup,
                 pipeline_steps, pipeline_runs)
        results.append(result)
    if progress is not None:
        progress(len(cases), len(cases), "done")
    _derive(results)
    info = {"shapes": shapes, "scale": scale, "params": num_params, "tensors": len(params),
            "block_size": block_size, "rounds": rounds, "warmup": warmup, "pipeline_steps": pipeline_steps,
            "pipeline_runs": pipeline_runs, "device": str(device)}
    return results, info


def _derive(results: list[Result]) -> None:
    """Fill in GB/s, % of ideal (at the copy's bandwidth) and speed-up vs fused AdamW from the
    synced times, and the speed-up vs fused AdamW from the pipelined times."""
    copy = next(r for r in results if r.case == "copy")
    fused = next(r for r in results if r.case == "torch AdamW fused")
    bandwidth = copy.ideal_bytes / copy.seconds
    for r in results:
        r.gbps = r.ideal_bytes / r.seconds / 1e9
        r.pct_ideal = 100 * (r.ideal_bytes / bandwidth) / r.seconds
        r.speedup = fused.seconds / r.seconds
        r.speedup_pipelined = fused.seconds_pipelined / r.seconds_pipelined
