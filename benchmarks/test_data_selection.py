"""Cost of influence scoring (sparse_grad.data) relative to a plain forward + backward of the
same candidate pool, on the demo transformer and on a Linear-only sequence MLP.

    pytest benchmarks/test_data_selection.py --benchmark-only [--device cuda]
    python benchmarks/test_data_selection.py [--device cuda] [--rounds 7]   # table with ratios
    python benchmarks/test_data_selection.py --device cuda --models tinylm-100m   # ~100M params, GPU

Cases per model: ``fwd+bwd`` (the pool's mean loss, backward into .grad), ``train step`` (a batch
of 16: forward, backward, SparseAdamW step), and ``score`` of the pool over: the blocks a
SparseAdamW at density 0.2 selected (``selected``), every block (``all``), and every block but
those that need the torch.func fallback (``hooked``; the demo model's learned position table).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_grad import SparseAdamW
from sparse_grad.data import InfluenceSelector, PerExampleNorms, resolve_blocks
from sparse_grad.demo import TinyLM, batches, lm_losses, stdlib_bytes

POOL, BATCH, DENSITY, BLOCK_SIZE = 54, 16, 0.2, 256  # a pool of ceil(16 / 0.3) candidates


class SequenceMLP(nn.Module):
    """Linear-heavy: byte embedding, four 256-wide Linear + GELU layers per token, a byte head."""

    def __init__(self, width=256, depth=4):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 256)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.hidden:
            h = h + F.gelu(layer(h))
        return self.head(h)


def make_cases(model_name: str, device: torch.device, quick: bool) -> dict:
    """``{case: fn}`` for one model, and the checks of --quick in ``fn.check`` where there are any."""
    torch.manual_seed(0)
    context, pool = (16, 6) if quick else (64, POOL)
    if model_name == "tinylm-100m":  # 99.9M params: 14 layers of width 768, context 256
        context = 256
        model = TinyLM(context, width=768, layers=14, heads=12)
    elif model_name == "tinylm":
        model = TinyLM(context, width=32 if quick else 128, layers=1 if quick else 2, heads=4)
    else:
        model = SequenceMLP(width=32 if quick else 256, depth=2 if quick else 4)
    model.to(device)
    x, y = next(batches(stdlib_bytes(100_000), 1, pool, context, seed=1))
    candidates = (x.to(device), y.to(device))
    train = (candidates[0][:BATCH], candidates[1][:BATCH])
    opt = SparseAdamW(model.parameters(), density=DENSITY, block_size=BLOCK_SIZE)
    lm_losses(model, train).mean().backward()
    opt.step()  # makes the selection the "selected" case scores over

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        lm_losses(model, candidates).mean().backward()

    def train_step():
        opt.zero_grad(set_to_none=True)
        lm_losses(model, train).mean().backward()
        opt.step()

    norms = PerExampleNorms(model, lm_losses)
    hooked = [b for b in resolve_blocks(model, None, block_size=BLOCK_SIZE) if norms.routes[b.name] != "torch.func"]
    selected = InfluenceSelector(model, lm_losses, blocks=opt)
    everything = InfluenceSelector(model, lm_losses, block_size=BLOCK_SIZE)
    cases = {"model": model, "fwd+bwd": fwd_bwd, "train step": train_step,
             "score selected": lambda: selected.score(candidates),
             "score hooked": lambda: norms.block_sqnorms(candidates, hooked),
             "score all": lambda: everything.score(candidates)}
    for name, scorer in (("score selected", selected.norms), ("score hooked", norms), ("score all", everything.norms)):
        cases[f"{name} forms"] = lambda scorer=scorer: _forms(scorer.last_methods)
    if quick:  # the scores must be finite, and the same by the ghost and the explicit forms
        def check():
            ghost = PerExampleNorms(model, lm_losses, linear_method="ghost").block_sqnorms(candidates, hooked)
            explicit = PerExampleNorms(model, lm_losses, linear_method="explicit").block_sqnorms(
                candidates, hooked)
            torch.testing.assert_close(ghost, explicit, rtol=1e-4, atol=1e-6 * float(explicit.max()))
            assert torch.isfinite(everything.score(candidates)).all()
        cases["check"] = check
    return cases


def _forms(methods: dict) -> dict:
    """How many parameters the last call computed each way (ghost, explicit, torch.func, ...)."""
    counts = {}
    for form in methods.values():
        counts[form] = counts.get(form, 0) + 1
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


MODELS = ["tinylm", "mlp"]
CASES = ["fwd+bwd", "train step", "score selected", "score hooked", "score all"]


@pytest.fixture(scope="module", params=MODELS)
def model_cases(request, device, quick):
    return request.param, make_cases(request.param, device, quick)


@pytest.mark.parametrize("case", CASES)
def test_data_selection_cost(benchmark, timed, quick, model_cases, case):
    model_name, cases = model_cases
    benchmark.group = f"data selection {model_name}"
    timed(cases[case])
    if quick and case == "score all":
        cases["check"]()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {MODELS + ['tinylm-100m']} (default {','.join(MODELS)})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"; pool {POOL} windows, density {DENSITY}, block {BLOCK_SIZE}; median of {args.rounds} interleaved rounds after 2 warm-ups")
    print(f"{'model':<11} {'case':<16} {'median ms':>10} {'vs fwd+bwd':>11}  per-layer forms used")
    for model_name in args.models.split(","):
        cases = make_cases(model_name, device, quick=False)
        if model_name == "tinylm-100m":
            print(f"tinylm-100m: {sum(p.numel() for p in cases['model'].parameters()):,} parameters")
        times = {name: [] for name in CASES}
        forms = {}
        # Rounds interleave the cases, so that the load of a shared machine weighs on all alike.
        for r in range(args.rounds + 2):
            for name in CASES:
                _sync(device)
                start = time.perf_counter()
                cases[name]()
                _sync(device)
                if r >= 2:
                    times[name].append(time.perf_counter() - start)
                if name.startswith("score"):
                    forms[name] = cases[f"{name} forms"]()
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name in CASES:
            used = ", ".join(f"{k} {v}" for k, v in sorted(forms.get(name, {}).items()))
            print(f"{model_name:<11} {name:<16} {1e3 * medians[name]:>10.1f} "
                  f"{medians[name] / medians['fwd+bwd']:>10.2f}x  {used}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
