"""``python -m sparse_grad bench``: time a SparseAdamW step against torch's AdamW in one run.

Measures a plain device copy of all parameters (the bandwidth), torch AdamW foreach and fused,
and a full SparseAdamW.step for every backend and density; prints a table with the median time
of a step timed alone and synchronized ("synced ms") and per step of --pipeline-steps steps run
back to back with one sync at the end ("pipelined ms"), the achieved rate of the ideal bytes
(4 B/param for the norm pass + 28 B/param·density, docs/design.md §7), that as a % of the copy's
bandwidth, the speed-up vs torch fused AdamW (synced and pipelined), the host time per step with
the kernels excluded ("host µs"; CPU: wall minus the time inside the backend's kernel entry
points, so torch AdamW has none; CUDA: wall of an unsynchronized step, with the time before the
first kernel call as "pre-launch µs") and the Python calls of one step (cProfile); writes
bench.csv and bench.json (with the machine, card, versions and date) and bench.png (speed-up vs
density, one line per backend, the ideal curve drawn in) to --out.

``--end-to-end`` times whole training steps instead (forward, backward, step) of the demo's
transformer LM (``--size``, default medium): dense torch AdamW (fused), SparseAdamW at the first
of --densities with reselect_every 1 and 10, dense and compact state, with and without
``sparse_grad.nn.sparse_backward`` (at reselect_every 10 also with ``compact_grads=True``), and
LoRA where peft is installed; steps interleaved across
the cases; median and mean step time, params + grads + optimizer state, the step's peak memory
(CUDA), and the loss after --steps steps; writes end_to_end.json to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from .. import _checks, backends
from ..bench import SHAPE_SETS, end_to_end, run as run_suite
from ..bench.report import machine_info, plot, table, write_csv, write_json
from ..progress import Progress
from . import checks

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="time SparseAdamW against torch AdamW (table, CSV, JSON, plot)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--shapes", default="llm-400m",
                        help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)} (default llm-400m)")
    parser.add_argument("--scale", type=float,
                        help="fraction of the ~400M-parameter sets to allocate (default 1.0 on cuda, 0.05 on cpu)")
    parser.add_argument("--densities", help="comma-separated (default 1,0.2,0.05,0.01; --end-to-end: one, 0.05)")
    parser.add_argument("--backends", help="comma-separated (default: every backend timed on the device; "
                                           "triton on cuda only)")
    parser.add_argument("--block-size", type=int, help="default 4096 (--end-to-end: the model preset's)")
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    parser.add_argument("--pipeline-steps", type=int, default=10,
                        help="steps back to back per pipelined run (median of 3 runs; default 10)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for bench.csv/.json/.png")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time whole training steps of a transformer LM (see below) instead of the step")
    parser.add_argument("--size", default="medium", choices=end_to_end.SIZES,
                        help="--end-to-end: the demo's model preset (default medium), or gpt2-medium "
                             "(GPT-2 medium's shape, 302M params: for a GPU)")
    parser.add_argument("--steps", type=int, default=30, help="--end-to-end: training steps per case (default 30)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    checks.device(args.device)
    for name in _list(args.shapes, "--shapes"):
        if name not in SHAPE_SETS:
            raise ValueError(f"--shapes: unknown shape set {name!r}; choose from {', '.join(SHAPE_SETS)}")
    if args.densities is None:
        args.densities = "0.05" if args.end_to_end else "1,0.2,0.05,0.01"
    densities = _list(args.densities, "--densities", float)
    for d in densities:
        _checks.density(d, "--densities")
    if args.end_to_end and len(densities) != 1:
        raise ValueError("--end-to-end takes one density in --densities")
    if args.backends is not None:
        for name in _list(args.backends, "--backends"):
            backends.check_backend(name, "--backends")
    checks.positive_ints(args, "rounds", "pipeline_steps", "steps", "threads")
    _checks.non_negative_int(args.warmup, "--warmup")
    if args.block_size is not None:
        _checks.block_size(args.block_size, "--block-size")
    if args.end_to_end and args.steps <= args.warmup:
        raise ValueError(f"--steps ({args.steps}) must be more than --warmup ({args.warmup})")
    if args.end_to_end and args.backends is not None and len(_list(args.backends, "--backends")) != 1:
        raise ValueError("--end-to-end takes one backend in --backends")
    if args.scale is not None:
        _checks.positive(args.scale, "--scale")


def _list(text: str, name: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name} is empty")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {convert.__name__}s, got {text!r}") from None


def progress_display(label: str):
    """run_suite's ``progress(done, total, case)`` callback, drawn by :class:`~sparse_grad.progress.Progress`
    (made at the first call, when the total is known)."""
    bar = None

    def report(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, label)
        bar.advance_to(done, what)
        if done == total:
            bar.close()
    return report


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.end_to_end:
        return run_end_to_end(args)
    args.block_size = args.block_size or 4096
    device = torch.device(args.device)
    shape_sets = _list(args.shapes, "--shapes")
    densities = _list(args.densities, "--densities", float)
    backend_names = None if args.backends is None else _list(args.backends, "--backends")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.05)
    results, infos = [], []
    for name in shape_sets:
        rows, info = run_suite(name, device, scale, densities, backend_names, args.block_size,
                               args.rounds, args.warmup, progress=progress_display(f"bench {name}"), pipeline_steps=args.pipeline_steps)
        results += rows
        infos.append(info)
    command = (f"python -m sparse_grad bench --device {device} --shapes {','.join(shape_sets)} --scale {scale:g} "
               f"--densities {','.join(f'{d:g}' for d in densities)} --block-size {args.block_size} "
               f"--rounds {args.rounds} --warmup {args.warmup} --pipeline-steps {args.pipeline_steps}"
               + (f" --backends {','.join(backend_names)}" if backend_names else ""))
    meta = {**machine_info(device), "command": command, "runs": infos}
    print(f"{meta['cpu']} ({meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads)"
          + (f", {meta['card']}" if meta["card"] else "") + f"; torch {torch.__version__}; {meta['date']}")
    for info in infos:
        print(f"{info['shapes']}: {info['params']:,} params in {info['tensors']} tensors (scale {info['scale']:g}), "
              f"block size {info['block_size']}, median of {info['rounds']} runs (pipelined: of "
              f"{info['pipeline_runs']} runs of {info['pipeline_steps']} steps)")
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "bench.csv", results, meta)
    write_json(args.out / "bench.json", results, meta)
    written = ["bench.csv", "bench.json"]
    if not args.no_plot:
        plot(args.out / "bench.png", results, f"SparseAdamW step on {device.type} ({', '.join(shape_sets)})")
        written.append("bench.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    return 0


def run_end_to_end(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    density = _list(args.densities, "--densities", float)[0]
    backend = "auto" if args.backends is None else _list(args.backends, "--backends")[0]
    results, info = end_to_end.run(device, args.size, args.steps, args.warmup, density, args.block_size, backend,
                                   progress=progress_display("bench --end-to-end"))
    command = (f"python -m sparse_grad bench --end-to-end --device {device} --size {args.size} --steps {args.steps} "
               f"--warmup {args.warmup} --densities {density:g} --block-size {info['block_size']} "
               f"--backends {backend}" + (f" --threads {args.threads}" if args.threads else ""))
    meta = {**machine_info(device), "command": command, "run": info}
    print(f"{meta['cpu']} ({meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads)"
          + (f", {meta['card']}" if meta["card"] else "") + f"; torch {torch.__version__}; {meta['date']}")
    print(f"TinyLM {info['size']}: {info['params']:,} params (width {info['width']}, {info['layers']} layers), "
          f"batch {info['batch']}x{info['context']} tokens, block size {info['block_size']}, {info['steps']} steps "
          f"(times: median and mean of the last {info['steps'] - info['warmup']}), "
          + ("LoRA via peft" if info["peft"] else "peft not installed: no LoRA case"))
    print(end_to_end.table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "end_to_end.json"
    path.write_text(json.dumps({**meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    print(f"wrote {path}")
    return 0
