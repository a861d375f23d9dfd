"""sparsify against dense torch and against SparseAdamW's fused kernels, timed interleaved.

benchmarks/test_sparsify_step.py times each case in turn; on a shared machine the load then
changes between cases, so this script steps every variant once per round, round-robin, and
reports the minimum (the least disturbed step) and median of the rounds: ratios within a round
see the same load. Then it splits one sparsify step into where the time goes (cProfile's own
time per function, summed by part over ``--profile-steps`` steps):

- ``selection``: the norm pass and the selection (sparse_grad's kernels, as in SparseAdamW);
- ``update``: the wrapped optimizer's functional on the gathered blocks: its torch ops and its
  own Python loop (``torch/optim/``), what the unwrapped optimizer runs too;
- ``gather/scatter``: ``index_select``/``index_copy_`` of params, grads and state;
- ``host reads``: reading ids and the selected blocks' step counts to the host (``tolist``);
- ``python``: everything else: sparsify's checks, cohorts and per-tensor bookkeeping (views,
  scalars, counts), and the Python of the selection.

    python benchmarks/sparsify_overhead.py --scale 0.01 --rounds 9 --threads 1
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import sparse_grad
from sparse_grad import SparseAdamW, backends
from sparse_grad.bench import make_params
from sparse_grad.bench.shapes import shapes as shape_set

WRAPPED = {"SGD": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}), "Adam": (torch.optim.Adam, {"lr": 1e-3}),
           "AdamW": (torch.optim.AdamW, {"lr": 1e-3})}
PARTS = {"selection": ("block_sqnorms", "select_blocks"), "gather/scatter": ("index_select", "index_copy_"),
         "host reads": ("tolist",)}


def variants(densities: list[float], backend: str) -> dict:
    made = {}
    for name, (cls, options) in WRAPPED.items():
        made[f"torch {name}"] = lambda ps, cls=cls, options=options: cls(ps, **options)
        for density in densities:
            made[f"sparsify({name}) d={density:g}"] = (
                lambda ps, cls=cls, options=options, density=density:
                sparse_grad.sparsify(cls(ps, **options), density=density, block_size=4096, backend=backend))
    # Random blocks every step: step counts spread, so one functional call per cohort of equal counts.
    made["sparsify(AdamW) d=0.05 random"] = lambda ps: sparse_grad.sparsify(
        torch.optim.AdamW(ps, lr=1e-3), density=0.05, block_size=4096, backend=backend, selection="random")
    for density in densities:
        made[f"SparseAdamW {backend} d={density:g}"] = (
            lambda ps, density=density: SparseAdamW(ps, lr=1e-3, density=density, block_size=4096, backend=backend))
    return made


def part_of(function: str, filename: str) -> str:
    for part, names in PARTS.items():
        if any(name in function for name in names):
            return part
    if "torch._C" in filename or "TensorBase" in function or filename == "~" or "torch/optim/" in filename:
        return "update"  # torch's ops and its functional's own Python loop over the tensors
    return "python"


def breakdown(opt, steps: int) -> dict[str, float]:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        opt.step()
    profile.disable()
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        part = part_of(function, filename)
        totals[part] = totals.get(part, 0.0) + own / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llm-400m")
    parser.add_argument("--scale", type=float, default=0.01)
    parser.add_argument("--densities", default="1,0.05,0.01")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a loaded machine OpenMP's barriers wait for "
                             "descheduled threads, which swamps every other cost)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    backend = backends.resolve("auto", device)
    densities = [float(d) for d in args.densities.split(",")]
    shape_list = shape_set(args.shapes, args.scale)
    optimizers = {}
    for name, make in variants(densities, backend).items():
        opt = make(make_params(shape_list, device))
        opt.step()  # state made outside the timing
        optimizers[name] = opt
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    n = sum(p.numel() for p in next(iter(optimizers.values())).param_groups[0]["params"])
    print(f"{args.shapes} at scale {args.scale}: {n:,} fp32 params in {len(shape_list)} tensors, block 4096, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"| case | min ms | median ms | min vs dense torch | min vs SparseAdamW same density |")
    print("|---|---|---|---|---|")
    mins = {name: min(values) for name, values in times.items()}
    for name, values in times.items():
        dense = next((mins[f"torch {w}"] for w in WRAPPED if f"({w})" in name or name == f"torch {w}"), None)
        fused = next((mins[f"SparseAdamW {backend} d={d:g}"] for d in densities if f"d={d:g}" in name), None)
        print(f"| {name} | {1e3 * mins[name]:.2f} | {1e3 * statistics.median(values):.2f} | "
              f"{'' if dense is None else f'{dense / mins[name]:.2f}x'} | "
              f"{'' if fused is None or name.startswith('SparseAdamW') else f'{mins[name] / fused:.1f}x slower'} |")
    for case in [f"sparsify(AdamW) d={density:g}" for density in densities] + ["sparsify(AdamW) d=0.05 random"]:
        print_breakdown(case, optimizers[case], args.profile_steps)


def print_breakdown(name: str, opt, steps: int) -> None:
    """One line: where ``steps`` steps of ``opt`` spend their time (:func:`breakdown`)."""
    parts = breakdown(opt, steps)
    total = sum(parts.values())
    print(f"{name}, cProfile own time per step: {1e3 * total:.2f} ms = "
          + ", ".join(f"{part} {1e3 * value:.2f} ms ({100 * value / total:.0f}%)"
                      for part, value in sorted(parts.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
