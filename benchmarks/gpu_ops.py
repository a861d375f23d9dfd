"""Per-op GPU timings of a SparseAdamW step at llm-400m (docs/design.md §7): the norm pass, the
selection and the update inside real steps, the full step synced and pipelined, against torch
AdamW fused and a plain copy measured in the same run.

    python benchmarks/gpu_ops.py --out gpu_out                    # CUDA, full size
    python benchmarks/gpu_ops.py --device cpu --scale 0.002 --backends cpp --out /tmp/o   # smoke

Per case (backend, density, reselect_every):
- ``synced``: median of single steps between CUDA events (L2 flushed before each);
- ``pipelined``: 20 steps back to back, median over runs (20: the host's time for the first
  step, before the GPU has work, is spread thin; two whole intervals of reselect_every=10);
- ``norm`` / ``select`` / ``update``: device time of the step's kernels by torch.profiler over
  the same steps, per step, each kernel put in one of the three by its name (``other``: the rest);
- ``% ideal``: the ideal bytes (bench.ideal_bytes: 4 B/param for the norm pass at a reselection,
  28 B/param x density for the update) at the measured copy bandwidth, over the time taken.
Selection alone is also timed on random scores of 98,688 and 1,048,576 blocks (``select_only``),
per tile size and per launch sequence of the Triton radix select.
One torch.profiler table of a triton step at density 0.05 goes to ``profile_d0.05.txt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

import sparse_grad
from sparse_grad import _unchecked
from sparse_grad.backends import triton_kernels
from sparse_grad.bench import ideal_bytes, make_params, median_time, pipelined_time, shapes

BLOCK_SIZE = 4096
PIPELINE_STEPS = 20
# Kernel-name fragments of each phase, for both GPU backends (Triton's @jit names, the CUDA
# kernels' names in csrc/cuda, and the torch ops the cuda selection launches).
PHASES = {
    "norm": ("sqnorm", "block_sq"),
    "select": ("select", "radix", "histogram", "topk", "sort", "compact", "scan", "threshold", "count",
               "rank_key", "bitonic", "gather_topk", "radixSort", "cub"),
    "update": ("adamw", "update"),
}


def phase_of(kernel: str) -> str:
    name = kernel.lower()
    for phase, fragments in PHASES.items():
        if any(f.lower() in name for f in fragments):
            return phase
    return "other"


def kernel_times(step, steps: int) -> dict[str, float]:
    """Device seconds per step of each phase over ``steps`` calls of ``step``, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out = {"norm": 0.0, "select": 0.0, "update": 0.0, "other": 0.0}
    launches = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out[phase_of(event.name)] += event.device_time_total / 1e6 / steps
            launches += 1
    out["launches"] = launches / steps
    return out


def copy_bandwidth(num_params: int, device) -> float:
    """Bytes per second of a device copy of the params' size (read + write counted)."""
    src = torch.randn(num_params, device=device)
    dst = torch.empty_like(src)
    return 8 * num_params / median_time(lambda: dst.copy_(src), device, rounds=20, warmup=3)


# Launch sequences of the Triton selection, forced (triton_kernels/select_blocks.py, plan()):
# "" is its own choice; the others undo one of its choices, to time each against it in one run.
SELECT_VARIANTS = {"": {}, "scan": dict(folded=False), "histograms": dict(sparse_keys=0),
                   "scan+histograms": dict(folded=False, sparse_keys=0)}


def select_call(backend: str, scores, blocks: int, k: int, tile: int | None, variant: str):
    """The selection of ``k`` of ``blocks`` scores as the case asks: the backend's own, or the
    Triton radix select with a tile size or a forced launch sequence."""
    if backend != "triton" or (tile is None and not variant):
        return lambda: _unchecked.select_blocks(scores, [blocks], [k], backend)
    return lambda: triton_kernels().select_blocks(scores, [blocks], [k], None, tile, **SELECT_VARIANTS[variant])


def select_rows(backend: str, device, scale: float, tiles: list[int | None], rounds: int = 20) -> list[dict]:
    """Selection alone on heavy-tailed random scores: wall time between CUDA events (launch gaps
    included) and the kernels' device time, per tile size of the radix select (None: default)
    and, at the default tile, per launch sequence (``SELECT_VARIANTS``)."""
    rows = []
    for blocks in (98_688, 1_048_576):
        blocks = max(1, int(blocks * scale)) if device.type == "cpu" else blocks  # a CPU smoke run
        scores = torch.rand(blocks, device=device) ** 8
        for density in (0.05, 0.01):
            k = max(1, round(density * blocks))
            expected = _unchecked.select_blocks(scores, [blocks], [k], "reference")
            cases = [(tile, "") for tile in tiles] + [(None, v) for v in SELECT_VARIANTS if v and None in tiles]
            for tile, variant in cases if backend == "triton" else [(None, "")]:
                call = select_call(backend, scores, blocks, k, tile, variant)
                if not torch.equal(call(), expected):
                    raise AssertionError(f"select_only {backend} tile={tile} {variant}: not the reference selection")
                row = dict(case="select_only", backend=backend, density=density, blocks=blocks, tile=tile,
                           variant=variant, synced=median_time(call, device, rounds=rounds, warmup=min(3, rounds)))
                if device.type == "cuda":
                    times = kernel_times(call, rounds)
                    row.update(select=times["select"] + times["other"], launches=times["launches"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def graph_rows(params, backend: str, device, rounds: int) -> list[dict]:
    """Steps replayed from CUDA graphs (no host work): what the device alone takes. A step
    that reselects (reselect_every=1) and one between reselections, each captured once;
    reselect_every=10 is 9 of the second and 1 of the first."""
    rows = []
    for density in (0.05, 0.01):
        graphs = []
        for every in (1, 10):
            opt = sparse_grad.SparseAdamW(params, lr=1e-5, density=density, block_size=BLOCK_SIZE,
                                          backend=backend, reselect_every=every)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # state and tables made; with every=10 the next step does not reselect
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            graphs.append((graph, opt))
            rows.append(dict(case="graph replay", backend=backend, density=density, reselect_every=every,
                             synced=median_time(graph.replay, device, rounds=rounds, warmup=2),
                             pipelined=pipelined_time(graph.replay, device, steps=PIPELINE_STEPS, runs=rounds, warmup=2)))
        reselect, between = rows[-2], rows[-1]
        for key in ("synced", "pipelined"):
            between[key] = (reselect[key] + 9 * between[key]) / 10
        for row in rows[-2:]:
            print(json.dumps(row), flush=True)
        del graphs
    return rows


def host_breakdown(params, backend: str, out: Path) -> None:
    """Host time of the pieces of a step between reselections (density 0.01), and a cProfile of
    50 such steps, appended to ``host_breakdown.txt``."""
    import cProfile
    import functools
    import io
    import pstats
    import time
    from sparse_grad.optim import binding, options
    from sparse_grad.optim import sparse_adamw as sparse_adamw_module
    opt = sparse_grad.SparseAdamW(params, lr=1e-5, density=0.01, block_size=BLOCK_SIZE, backend=backend,
                                  reselect_every=10**6)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    spent: dict[str, float] = {}

    def timed(module, name):
        function = getattr(module, name)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - begin
        setattr(module, name, wrapper)
        return module, name, function

    saved = [timed(m, n) for m, n in [(binding, "reuse"), (options, "check_hyper"),
                                        (sparse_adamw_module, "sparse_step"),
                                        (sparse_grad.backends.get(backend), "sparse_adamw_step")]]
    steps = 200
    try:
        begin = time.perf_counter()
        for _ in range(steps):
            opt.step()
        total = time.perf_counter() - begin
    finally:
        for module, name, function in saved:
            setattr(module, name, function)
    torch.cuda.synchronize()
    lines = [f"{backend}: host us per step between reselections ({steps} unsynchronized steps): "
             f"{1e6 * total / steps:.1f}"]
    lines += [f"  {name}: {1e6 * seconds / steps:.1f} us" for name, seconds in spent.items()]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        opt.step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    with open(out / "host_breakdown.txt", "a") as f:
        f.write("\n".join(lines) + "\n" + text.getvalue() + "\n")
    print("\n".join(lines), flush=True)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    shape_list = shapes("llm-400m", args.scale)
    params = make_params(shape_list, device)
    n = sum(p.numel() for p in params)
    bw = copy_bandwidth(n, device)
    rows = [dict(case="copy", backend=None, density=None, reselect_every=None, synced=8 * n / bw, pipelined=float("nan"))]
    print(f"{len(params)} tensors, {n / 1e6:.1f}M params, {sum(-(-p.numel() // BLOCK_SIZE) for p in params)} blocks; "
          f"copy {bw / 1e9:.0f} GB/s", flush=True)

    def timed(case, backend, density, every, opt):
        opt.step()  # the state, outside the timing
        steps = PIPELINE_STEPS
        row = dict(case=case, backend=backend, density=density, reselect_every=every,
                   synced=median_time(opt.step, device, rounds=args.rounds, warmup=2),
                   pipelined=pipelined_time(opt.step, device, steps=steps, runs=args.rounds, warmup=2))
        if device.type == "cuda":
            row.update(kernel_times(opt.step, steps))
        if density is not None:
            moved = ideal_bytes(n, density, every)
            row["pct_ideal"] = moved / bw / row["pipelined"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return opt

    for flag in ("fused", "foreach"):
        timed(f"torch AdamW {flag}", None, None, 1, torch.optim.AdamW(params, lr=1e-5, **{flag: True}))
    for backend in args.backends:
        for density, every in [(1.0, 1), (0.05, 1), (0.01, 1), (0.05, 10), (0.01, 10)]:
            opt = sparse_grad.SparseAdamW(params, lr=1e-5, density=density, block_size=BLOCK_SIZE,
                                          backend=backend, reselect_every=every)
            timed("SparseAdamW", backend, density, every, opt)
            if device.type == "cuda" and density == 0.05 and every == 1 and backend == args.backends[0]:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        opt.step()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
                (args.out / "profile_d0.05.txt").write_text(table)
            del opt
        rows += select_rows(backend, device, args.scale, args.tiles)
        if device.type == "cuda":
            for extra in (lambda: rows.extend(graph_rows(params, backend, device, args.rounds)),
                          lambda: host_breakdown(params, backend, args.out)):
                try:  # a diagnostic: its failure must not cost the other backend's numbers
                    extra()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
    return rows


def _ms(row: dict, key: str) -> str:
    value = row.get(key, float("nan"))
    return "" if value != value else f"{1e3 * value:.3f}"


def table(rows: list[dict]) -> str:
    fused = next(r for r in rows if r["case"] == "torch AdamW fused")
    lines = ["| case | backend | d | every | synced ms | pipelined ms | norm | select | update | other | launches "
             "| × fused (pipelined) | % ideal |", "|" + "---|" * 13]
    for r in rows:
        case = f"{r['case']} {r['blocks']} blocks" if "blocks" in r else r["case"]
        case += f" tile {r['tile']}" if r.get("tile") else ""
        case += f" ({r['variant']})" if r.get("variant") else ""
        density = "" if r.get("density") is None else f"{r['density']:g}"
        timed_step = r["case"] not in ("copy", "select_only") and "pipelined" in r
        speed = f"{fused['pipelined'] / r['pipelined']:.2f}" if timed_step else ""
        ideal = f"{100 * r['pct_ideal']:.0f}%" if "pct_ideal" in r else ""
        launches = f"{r['launches']:.0f}" if "launches" in r else ""
        lines.append(f"| {case} | {r.get('backend') or ''} | {density} | {r.get('reselect_every') or ''} "
                     f"| {_ms(r, 'synced')} | {_ms(r, 'pipelined')} | {_ms(r, 'norm')} | {_ms(r, 'select')} "
                     f"| {_ms(r, 'update')} | {_ms(r, 'other')} | {launches} | {speed} | {ideal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tiles", default="default,512,1024,2048,4096",
                        help="tile sizes of the Triton radix select to time ('default': its own choice)")
    parser.add_argument("--out", type=Path, default=Path("gpu_out"))
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.tiles = [None if t == "default" else int(t) for t in args.tiles.split(",") if t]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    (args.out / "gpu_ops.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "gpu_ops.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
