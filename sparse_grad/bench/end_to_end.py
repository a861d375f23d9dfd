"""End-to-end training steps (forward, backward, optimizer step) of the demo's transformer LM:
dense torch AdamW (fused), SparseAdamW with and without ``sparse_grad.nn.sparse_backward`` at
``reselect_every`` 1 and 10, dense and compact state, and LoRA (peft, where installed) on the
same model and data, in one run, steps interleaved across the cases so that a change in the
machine's load hits every case alike (docs/design.md §11).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..demo.data import batches, stdlib_bytes
from ..demo.experiment import config_for
from ..demo.model import TinyLM, lm_loss
from ..nn import sparse_backward
from ..optim import SparseAdamW
from ..targeting import param_groups

__all__ = ["Case", "EndToEnd", "cases", "run"]

LINEARS = ["attn_qkv", "attn_out", "mlp_in", "mlp_out"]  # LoRA's targets: every Linear of a layer


@dataclass(frozen=True)
class Case:
    """One training setup: ``build(model)`` returns (the model to call, its optimizer)."""

    name: str
    build: Callable[[nn.Module], tuple[nn.Module, torch.optim.Optimizer]]
    sparse_backward: bool = False
    compact_grads: bool = False  # sparse_backward(..., compact_grads=True)


@dataclass
class EndToEnd:
    """One case's figures. Times in seconds per step (forward + backward + step + zero_grad);
    ``state_bytes``: params + grads + optimizer state after the last step's backward and step;
    ``peak_bytes`` (CUDA only): the step's peak allocation above what was allocated before it,
    plus this case's params and optimizer state; losses: mean training loss of the last 5 steps
    and the loss on held-out batches after the last step."""

    case: str
    median_seconds: float
    mean_seconds: float
    state_bytes: int
    peak_bytes: int | None
    train_loss: float
    val_loss: float
    trainable: int


def _sparse(density: float, block_size: int, reselect_every: int, layout: str, backend: str):
    def build(model):
        groups = param_groups(model, density=density, weight_decay=0.01)
        return model, SparseAdamW(groups, lr=1e-3, block_size=block_size, reselect_every=reselect_every,
                                  state_layout=layout, backend=backend)
    return build


def _adamw(model):
    fused = model.head.weight.device.type in ("cpu", "cuda")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)


def _lora(rank: int):
    def build(model):
        import peft
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEARS))
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped, torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    return build


def cases(density: float, block_size: int, backend: str = "auto", lora_rank: int = 16) -> list[Case]:
    """The cases of the issue: AdamW, SparseAdamW × reselect_every {1, 10} × sparse_backward
    {off, on} × state {dense, compact}, at R=10 also sparse_backward with compact grads, LoRA
    where peft is installed."""
    out = [Case("AdamW (fused)", _adamw)]
    for reselect_every in (1, 10):
        for layout in ("dense", "compact"):
            for use, compact_grads in ((False, False), (True, False), (True, True)):
                if compact_grads and reselect_every == 1:  # every step reselects: full grads, as above
                    continue
                name = (f"d={density:g} R={reselect_every} {layout}" + (" +sparse_backward" if use else "")
                        + (" compact grads" if compact_grads else ""))
                out.append(Case(name, _sparse(density, block_size, reselect_every, layout, backend), use,
                                compact_grads))
    try:
        import peft  # noqa: F401
    except ImportError:
        return out
    return out + [Case(f"LoRA r={lora_rank} (peft)", _lora(lora_rank))]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _grad_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """The gradients' bytes: full-size ``.grad`` tensors and compact grad slabs (read before the
    step, which drops the slabs)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if isinstance(opt, SparseAdamW):
        grads += [opt.group_state(i).compact_grad.slab for i in range(len(opt.param_groups))
                  if opt.group_state(i).compact_grad is not None]
    return _bytes(grads)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer, grad_bytes: int | None = None) -> int:
    """params + grads (``grad_bytes`` if given, else what is there now) + optimizer state."""
    state = [v for s in opt.state.values() for v in s.values()]
    if isinstance(opt, SparseAdamW):
        state += [t for i in range(len(opt.param_groups))
                  for t in (opt.group_state(i).compact or {}).values()]
    grad_bytes = _grad_bytes(model, opt) if grad_bytes is None else grad_bytes
    return _bytes(model.parameters()) + grad_bytes + _bytes(state)


# Bench-only model sizes beside the demo's presets: GPT-2 medium's shape (width 1024, 24 layers,
# 16 heads, context 1024; byte vocabulary, so 302M parameters instead of GPT-2's 355M) for the
# GPU measurement the end-to-end targets name (docs/design.md §7).
BENCH_SIZES = {"gpt2-medium": {"width": 1024, "layers": 24, "heads": 16, "context": 1024, "batch": 8,
                               "block_size": 4096}}
SIZES = ("quick", "small", "medium", "large", *BENCH_SIZES)


def model_config(size: str):
    """The model and batch of ``size``: the demo's presets (small, medium, large; "quick" is the
    demo's --quick model) or one of :data:`BENCH_SIZES`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "quick":
        return config_for("small", quick=True)
    if size in BENCH_SIZES:
        return config_for("large", **BENCH_SIZES[size])
    return config_for(size)


def run(device: torch.device, size: str = "medium", steps: int = 30, warmup: int = 3, density: float = 0.05,
        block_size: int | None = None, backend: str = "auto", seed: int = 0, lora_rank: int = 16,
        progress: Callable[[int, int, str], None] | None = None) -> tuple[list[EndToEnd], dict]:
    """Train every case ``steps`` steps from the same initial weights on the same batches
    (windows of the standard library's source); steps interleaved across cases. Step times
    exclude the first ``warmup`` steps."""
    cfg = model_config(size)
    context, batch = cfg.context, cfg.batch
    block_size = block_size or cfg.block_size

    def new_model():
        return TinyLM(context, cfg.width, cfg.layers, cfg.heads)

    data = stdlib_bytes(1_000_000)
    train = [(x.to(device), y.to(device)) for x, y in batches(data[:900_000], steps, batch, context, seed)]
    val = [(x.to(device), y.to(device)) for x, y in batches(data[900_000:], 4, batch, context, seed + 1)]
    torch.manual_seed(seed)
    initial = new_model().state_dict()
    runs = []
    for case in cases(density, block_size, backend, lora_rank):
        model = new_model()
        model.load_state_dict(initial)
        model, opt = case.build(model.to(device))
        handle = sparse_backward(model, opt, case.compact_grads) if case.sparse_backward else None
        runs.append({"case": case, "model": model, "opt": opt, "handle": handle, "times": [], "losses": []})
    cuda = device.type == "cuda"
    peaks = {id(r): 0 for r in runs}
    for step, (x, y) in enumerate(train):
        for r in runs:
            model, opt = r["model"], r["opt"]
            if cuda:
                torch.cuda.synchronize(device)
                resident = _state_bytes(model, opt)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            loss = lm_loss(model, x, y)
            loss.backward()
            grad_bytes = _grad_bytes(model, opt) if step == steps - 1 else None
            opt.step()
            if step == steps - 1:
                r["state_bytes"] = _state_bytes(model, opt, grad_bytes)
            opt.zero_grad()
            if cuda:
                torch.cuda.synchronize(device)
                peaks[id(r)] = max(peaks[id(r)], torch.cuda.max_memory_allocated(device) - before + resident)
            r["times"].append(time.perf_counter() - start)
            r["losses"].append(loss.item())
            if progress is not None:
                progress(step * len(runs) + runs.index(r) + 1, steps * len(runs), r["case"].name)
    results = []
    for r in runs:
        with torch.no_grad():
            val_loss = statistics.fmean(lm_loss(r["model"], x, y).item() for x, y in val)
        if r["handle"] is not None:
            r["handle"].remove()
        timed = r["times"][warmup:]
        results.append(EndToEnd(r["case"].name, statistics.median(timed), statistics.fmean(timed), r["state_bytes"],
                                peaks[id(r)] if cuda else None, statistics.fmean(r["losses"][-5:]), val_loss,
                                sum(p.numel() for p in r["model"].parameters() if p.requires_grad)))
    info = {"size": size, "width": cfg.width, "layers": cfg.layers, "context": context, "batch": batch,
            "params": sum(p.numel() for p in new_model().parameters()),
            "block_size": block_size, "density": density, "steps": steps, "warmup": warmup, "seed": seed,
            "peft": any(c.name.startswith("LoRA") for c in cases(density, block_size, backend, lora_rank))}
    return results, info


def table(results: list[EndToEnd]) -> str:
    """One row per case, with the speed-up and memory against the first case (AdamW)."""
    base = results[0]
    lines = [f"{'case':<52} {'median ms':>9} {'mean ms':>8} {'vs AdamW':>8} {'p+g+s MiB':>9} {'vs AdamW':>8} "
             f"{'peak MiB':>8} {'train loss':>10} {'val loss':>8}"]
    for r in results:
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        lines.append(f"{r.case:<52} {r.median_seconds * 1e3:>9.1f} {r.mean_seconds * 1e3:>8.1f} "
                     f"{base.median_seconds / r.median_seconds:>7.2f}x {r.state_bytes / 2**20:>9.2f} "
                     f"{r.state_bytes / base.state_bytes:>8.2f} {peak:>8} {r.train_loss:>10.4f} {r.val_loss:>8.4f}")
    return "\n".join(lines)
