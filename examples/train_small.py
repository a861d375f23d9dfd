"""Train a small byte-level transformer LM on Python's own standard-library source with
torch.optim.AdamW and with SparseAdamW at several densities; print loss and optimizer time.

    python examples/train_small.py               # CPU, about a minute on 2 cores
    python examples/train_small.py --device cuda --steps 500

Every run starts from the same initial weights and sees the same batches.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sparse_grad import SparseAdamW
from sparse_grad.demo import TinyLM, batches, lm_loss, stdlib_bytes, train_val_split


@torch.no_grad()
def evaluate(model, data, args, device):
    model.eval()
    losses = [lm_loss(model, x.to(device), y.to(device)).item()
              for x, y in batches(data, 8, args.batch, args.context, seed=12345)]
    model.train()
    return statistics.mean(losses)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def train(name, make_opt, train_data, val_data, args, device):
    torch.manual_seed(0)
    model = TinyLM(args.context).to(device)
    opt = make_opt(model.parameters())
    losses, step_times = [], []
    for x, y in batches(train_data, args.steps, args.batch, args.context, seed=1):
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return dict(name=name, train=statistics.mean(losses[-10:]), val=evaluate(model, val_data, args, device),
                step_ms=1e3 * statistics.median(step_times[3:] or step_times),
                state_mb=state_bytes(opt) / 2**20, params=sum(p.numel() for p in model.parameters()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--block-size", type=int, default=256,
                        help="elements per block (the library default, 4096, is sized for large models)")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.05])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--bytes", type=int, default=2_000_000, help="how much stdlib source to use")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = stdlib_bytes(args.bytes)
    train_data, val_data = train_val_split(data)
    print(f"data: {data.numel():,} bytes of standard-library source (90% train, 10% validation); "
          f"device {device}; {args.steps} steps of {args.batch}x{args.context} tokens")

    runs = [("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=args.lr))]
    runs += [(f"SparseAdamW d={d:g}",
              lambda ps, d=d: SparseAdamW(ps, lr=args.lr, density=d, block_size=args.block_size,
                                          backend=args.backend)) for d in args.densities]
    results = []
    for name, make_opt in runs:
        results.append(train(name, make_opt, train_data, val_data, args, device))
        r = results[-1]
        print(f"  {name:<20} done: val loss {r['val']:.3f}", flush=True)

    print(f"\nmodel: {results[0]['params']:,} parameters; block size {args.block_size}; "
          f"uniform-guess loss ln(256) = {math.log(256):.3f}")
    print(f"{'optimizer':<20} {'train loss':>10} {'val loss':>9} {'step ms':>8} {'vs AdamW':>9} {'state MiB':>10}")
    base = results[0]["step_ms"]
    for r in results:
        print(f"{r['name']:<20} {r['train']:>10.3f} {r['val']:>9.3f} {r['step_ms']:>8.2f} "
              f"{base / r['step_ms']:>8.2f}x {r['state_mb']:>10.2f}")
    return results


if __name__ == "__main__":
    main()
