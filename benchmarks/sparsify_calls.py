"""Per-step overhead of sparsify: Python calls (cProfile, deterministic) and median step time,
against SparseAdamW's fused step on the same params (docs/design.md §10, benchmarks/RESULTS.md).

Calls are counted over ``reselect_every`` consecutive steps and divided by them, so a case with
reselect_every 10 shows the average over one interval (one step reselects, nine keep the ids).
Times are medians over interleaved rounds (every case steps once per round, in turn: on a
shared machine the load then falls on every case alike).

Then, with ``--breakdown-steps``, where a sparsify step's time goes (cProfile's own time by part,
as ``sparsify_overhead.py`` splits it).

    python benchmarks/sparsify_calls.py --scale 0.01 --rounds 21 --threads 1 --breakdown-steps 20
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparse_grad
from sparsify_overhead import print_breakdown
from sparse_grad import SparseAdamW, backends
from sparse_grad.bench import make_params, python_calls
from sparse_grad.bench.shapes import shapes as shape_set


def cases(backend: str, layouts: list[str]) -> dict:
    made = {}
    for density in (0.05, 0.01):
        for every in (1, 10):
            options = {"density": density, "block_size": 4096, "reselect_every": every, "backend": backend}
            for layout in layouts:
                made[f"sparsify(AdamW) {layout} d={density:g} every={every}"] = (
                    lambda ps, options=options, layout=layout: sparse_grad.sparsify(
                        torch.optim.AdamW(ps, lr=1e-3), state_layout=layout, **options), every)
            made[f"SparseAdamW d={density:g} every={every}"] = (
                lambda ps, options=options: SparseAdamW(ps, lr=1e-3, **options), every)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llm-400m")
    parser.add_argument("--scale", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layouts", default="dense,compact")
    parser.add_argument("--breakdown-steps", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    backend = backends.resolve("auto", device)
    shape_list = shape_set(args.shapes, args.scale)
    built = {}
    for name, (make, every) in cases(backend, args.layouts.split(",")).items():
        opt = make(make_params(shape_list, device))
        opt.step()  # state and caches made outside the counts
        calls = sum(python_calls(opt.step) for _ in range(every)) / every
        built[name] = (opt, calls)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (opt, _) in built.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    n = sum(p.numel() for p in next(iter(built.values()))[0].param_groups[0]["params"])
    print(f"{args.shapes} at scale {args.scale}: {n:,} fp32 params in {len(shape_list)} tensors, block 4096, "
          f"backend {backend}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print("| case | Python calls per step | median step ms | vs SparseAdamW (median) |")
    print("|---|---|---|---|")
    for name, (_, calls) in built.items():
        median = statistics.median(times[name])
        fused = next((statistics.median(times[f"SparseAdamW {tail}"]) for tail in [name.split(" ", 2)[-1]]
                      if f"SparseAdamW {tail}" in times), None)
        ratio = "" if fused is None or name.startswith("SparseAdamW") else f"{median / fused:.1f}x"
        print(f"| {name} | {calls:,.0f} | {1e3 * median:.2f} | {ratio} |")
    for name, (opt, _) in built.items():
        if args.breakdown_steps and name.startswith("sparsify"):
            print_breakdown(name, opt, args.breakdown_steps)


if __name__ == "__main__":
    main()
