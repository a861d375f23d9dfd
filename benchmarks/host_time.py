"""Host cost of one steady-state SparseAdamW step, for whichever sparse_grad is importable.

A standalone script (it uses only ``SparseAdamW`` and ``sparse_grad.backends.get``), so the same
measurement runs on two versions of the package in one session, e.g. the checkout and an older
copy put first on PYTHONPATH. Per backend and density it prints:

- ``py calls``: cProfile ``total_calls`` of one steady-state step (deterministic);
- ``host us``: wall time of an unsynchronized ``step()`` started with the device idle (CUDA: the
  kernels run asynchronously, so this is the host's share), median of ``--rounds``;
- ``pre-launch us``: from the call to the first kernel entry point of the backend (the module
  attributes ``block_sqnorms``, ``select_blocks``, ``sparse_adamw_step``), median;
- ``step ms``: the synchronized step, for scale.

``--stub-kernels`` replaces the kernel entry points by stand-ins that take no time (the norms and
the selection of the first call, kept; no update), so on a CPU, where the kernels run
synchronously, ``host us`` is the host path alone. ``--reselect-every`` sets the option.

    python benchmarks/host_time.py --device cuda --backends triton,cuda --densities 1,0.05,0.01
    python benchmarks/host_time.py --device cpu --backends cpp --scale 0.002 --stub-kernels --reselect-every 10
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch

import sparse_grad
from sparse_grad import SparseAdamW, backends
from sparse_grad.bench.shapes import shapes as shape_set

KERNELS = ("block_sqnorms", "select_blocks", "sparse_adamw_step")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stub_kernels(backend: str) -> dict:
    """Stand-ins for the backend's kernels: the first call's norms and selection, kept (in the
    dict returned: clear it for a new optimizer); no update."""
    module = backends.get(backend)
    real, kept = {name: getattr(module, name) for name in KERNELS}, {}

    def keep(name):
        def first(*args, **kwargs):
            if name not in kept:
                kept[name] = real[name](*args, **kwargs)
            return kept[name]
        return first

    module.block_sqnorms, module.select_blocks = keep("block_sqnorms"), keep("select_blocks")
    module.sparse_adamw_step = lambda *args, **kwargs: None
    return kept


def measure(opt, device: torch.device, backend: str, rounds: int) -> dict:
    for _ in range(3):
        opt.step()
    sync(device)
    profile = cProfile.Profile()
    profile.enable()
    opt.step()
    profile.disable()
    calls = pstats.Stats(profile).total_calls
    module = backends.get(backend)
    first = []
    real = {name: getattr(module, name) for name in KERNELS}

    def entry(name):
        def wrapped(*args, **kwargs):
            if not first:
                first.append(time.perf_counter())
            return real[name](*args, **kwargs)
        return wrapped

    host, before, step = [], [], []
    try:
        for name in KERNELS:
            setattr(module, name, entry(name))
        for _ in range(rounds):
            sync(device)
            first.clear()
            begin = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            sync(device)
            done = time.perf_counter()
            host.append(end - begin)
            before.append((first[0] if first else end) - begin)
            step.append(done - begin)
    finally:
        for name in KERNELS:
            setattr(module, name, real[name])
    return {"python_calls": calls, "host_us": 1e6 * statistics.median(host),
            "pre_launch_us": 1e6 * statistics.median(before), "step_ms": 1e3 * statistics.median(step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="llm-400m")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--densities", default="1,0.05,0.01")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reselect-every", type=int, default=1)
    parser.add_argument("--stub-kernels", action="store_true", help="time the host path alone (see above)")
    parser.add_argument("--label", default=sparse_grad.__file__)
    parser.add_argument("--json", help="append one JSON line per case to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shape_set(args.shapes, args.scale)]
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{args.label}: {len(params)} tensors, {sum(p.numel() for p in params):,} params on {device}")
    print(f"{'backend':<9}{'density':>8}{'py calls':>10}{'host us':>10}{'pre-launch us':>15}{'step ms':>9}")
    for backend in args.backends.split(","):
        if backends.unavailable_reason(backend, device) is not None:
            print(f"{backend:<9} unavailable: {backends.unavailable_reason(backend, device)}")
            continue
        kept = stub_kernels(backend) if args.stub_kernels else {}
        for density in map(float, args.densities.split(",")):
            kept.clear()
            opt = SparseAdamW(params, lr=1e-6, density=density, backend=backend, reselect_every=args.reselect_every)
            row = measure(opt, device, backend, args.rounds)
            print(f"{backend:<9}{density:>8g}{row['python_calls']:>10}{row['host_us']:>10.1f}"
                  f"{row['pre_launch_us']:>15.1f}{row['step_ms']:>9.3f}")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"label": args.label, "backend": backend, "density": density,
                                        "reselect_every": args.reselect_every, "stub_kernels": args.stub_kernels,
                                        **row}) + "\n")
            del opt


if __name__ == "__main__":
    main()
