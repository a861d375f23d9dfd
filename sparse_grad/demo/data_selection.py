"""The parameter × data experiment: few blocks and few examples, chosen together or at random.

The demo transformer is pre-trained briefly on the standard library's source, then adapted to
English prose (``pydoc_data.topics``) five ways from the same weights, with the same optimizer
steps, batch size, learning rate and data stream:

=====================  ===============================  ======================================
run                    parameters (SparseAdamW, 0.2)     data (0.3 of each candidate pool)
=====================  ===============================  ======================================
influence × influence  ``selection="norm"``              top by influence on the selected blocks
influence × random     ``selection="norm"``              uniformly at random from the same pool
random × influence     ``selection="random"``            top by influence on the selected blocks
random × random        ``selection="random"``            uniformly at random from the same pool
dense AdamW            ``torch.optim.AdamW``, all        every drawn example (plain batches)
=====================  ===============================  ======================================

Cadence: SparseAdamW reselects every ``R`` steps and the sampler scores a new pool every ``R``
steps, one step after each reselection (the first step trains on a plain batch), so a pool is
scored against the blocks that are updated for ``R − 1`` of the ``R`` steps it serves (with
``R = 1`` a random selection would change before the scored data is used).

Budget: every run takes the same number of optimizer steps on batches of the same size. Γ is the
wall-clock device time of the training steps, scoring included (:class:`ResourceMeter`,
evaluation excluded); held-out loss is the mean next-byte loss on fixed windows of the prose
validation split, and CPR = (loss before − loss after) / Γ, in nats per device-hour.

``python -m sparse_grad demo --data-selection [--quick] [--out DIR]`` writes
``data_selection.md`` and ``data_selection.json`` to ``DIR`` (default ``sparse_grad_demo/``).
"""
from __future__ import annotations

import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import SparseAdamW, __version__, _checks
from ..cpr import ResourceMeter
from ..data import InfluenceSampler, InfluenceSelector
from .data import batches, prose_bytes, stdlib_bytes, train_val_split, window_sampler
from .model import TinyLM, lm_losses

__all__ = ["CONFIGS", "RUNS", "run_experiment", "to_markdown"]

# quick: under a minute on a 2-core CPU; default: about three.
CONFIGS = {
    "quick": {"context": 32, "width": 64, "layers": 2, "heads": 4, "pretrain_steps": 100, "steps": 60,
              "batch": 16, "refresh_every": 4, "eval_windows": 64, "seeds": (0, 1)},
    "default": {"context": 64, "width": 128, "layers": 2, "heads": 4, "pretrain_steps": 120, "steps": 100,
                "batch": 16, "refresh_every": 4, "eval_windows": 128, "seeds": (0, 1)},
}
DENSITY, DATA_FRACTION, BLOCK_SIZE = 0.2, 0.3, 256
LR, PRETRAIN_LR, WEIGHT_DECAY = 2e-3, 3e-3, 0.01
# (name, parameter selection or None for dense AdamW, data selection or None for all data)
RUNS = (("influence × influence", "norm", "influence"), ("influence params × random data", "norm", "random"),
        ("random params × influence data", "random", "influence"), ("random × random", "random", "random"),
        ("dense AdamW, all data", None, None))


@torch.no_grad()
def held_out_loss(model, windows) -> float:
    x, y = windows
    return float(torch.cat([lm_losses(model, (x[i:i + 64], y[i:i + 64])) for i in range(0, len(x), 64)]).mean())


def _pretrained(cfg: dict, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(cfg["context"], width=cfg["width"], layers=cfg["layers"], heads=cfg["heads"])
    train, _ = train_val_split(stdlib_bytes(400_000))
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=WEIGHT_DECAY)
    for x, y in batches(train, cfg["pretrain_steps"], cfg["batch"], cfg["context"], seed=seed):
        loss = lm_losses(model, (x, y)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def _adapt(model, params: str | None, data: str | None, cfg: dict, train: torch.Tensor, seed: int) -> dict:
    """One run: ``cfg["steps"]`` steps from ``model``'s weights; returns what it spent."""
    steps, batch, every = cfg["steps"], cfg["batch"], cfg["refresh_every"]
    draw = window_sampler(train, cfg["context"])
    if params is None:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        stream = iter(batches(train, steps, batch, cfg["context"], seed=1000 + seed))
        sampler = None
    else:
        opt = SparseAdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, density=DENSITY,
                          block_size=BLOCK_SIZE, reselect_every=every, selection=params, seed=seed)
        selector = InfluenceSelector(model, lm_losses, blocks=opt, data_fraction=DATA_FRACTION)
        sampler = InfluenceSampler(selector, draw, batch_size=batch, refresh_every=every, seed=1000 + seed,
                                   selection=data)
        first = draw(batch, torch.Generator().manual_seed(2000 + seed))  # before the first selection
        stream = _first_then(first, sampler)
    losses = []
    with ResourceMeter("cpu", energy=False) as meter:
        meter.attach(opt)
        for _ in range(steps):
            x, y = next(stream)
            loss = lm_losses(model, (x, y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    report = meter.report()
    return {"device_s": report.device_hours * 3600.0, "peak_rss_gib": report.peak_memory_gib,
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "scored": sampler.scored if sampler else 0, "scoring_s": sampler.scoring_s if sampler else 0.0,
            "candidates": sampler.candidates if sampler else steps * batch}


def _first_then(first, sampler):
    yield first
    yield from sampler


def run_experiment(quick: bool = False, out: str | Path | None = None, *, steps: int | None = None,
                   pretrain_steps: int | None = None, seeds: tuple[int, ...] | None = None) -> dict:
    """Run the five adaptations (per seed) and return the results; with ``out``, also write
    ``data_selection.md`` and ``data_selection.json`` there. ``steps``, ``pretrain_steps`` and
    ``seeds`` override the mode's settings (for tests)."""
    cfg = dict(CONFIGS["quick" if _checks.flag(quick, "quick") else "default"])
    if steps is not None:
        cfg["steps"] = _checks.positive_int(steps, "steps")
    if pretrain_steps is not None:
        cfg["pretrain_steps"] = _checks.non_negative_int(pretrain_steps, "pretrain_steps")
    if seeds is not None:
        cfg["seeds"] = tuple(_checks.non_negative_int(s, "seeds[]") for s in seeds)
        if not cfg["seeds"]:
            raise ValueError("seeds must name at least one seed")
    train, val = train_val_split(prose_bytes(1 << 20))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as fast as two threads, and steadier on a shared machine
    started = time.perf_counter()
    try:
        per_seed = []
        for seed in cfg["seeds"]:
            base = _pretrained(cfg, seed)
            windows = next(batches(val, 1, cfg["eval_windows"], cfg["context"], seed=99))
            before = held_out_loss(base, windows)
            runs = {}
            for name, params, data in RUNS:
                model = copy.deepcopy(base)
                spent = _adapt(model, params, data, cfg, train, seed)
                after = held_out_loss(model, windows)
                runs[name] = {"params": params or "dense", "data": data or "all", "loss_before": before,
                              "loss_after": after, **spent,
                              "cpr": (before - after) / (spent["device_s"] / 3600.0)}
            per_seed.append({"seed": seed, "runs": runs})
    finally:
        torch.set_num_threads(threads)
    results = {"config": {**cfg, "seeds": list(cfg["seeds"]), "density": DENSITY, "data_fraction": DATA_FRACTION,
                          "block_size": BLOCK_SIZE, "lr": LR, "pretrain_lr": PRETRAIN_LR,
                          "weight_decay": WEIGHT_DECAY, "mode": "quick" if quick else "default"},
               "summary": _summary(per_seed), "per_seed": per_seed,
               "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "sparse_grad": __version__, "threads": 1},
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 (3.10: no datetime.UTC)
               "command": "python -m sparse_grad demo --data-selection" + (" --quick" if quick else ""),
               "wall_s": time.perf_counter() - started}
    results["verdict"] = _verdict(results["summary"])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_selection.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "data_selection.md").write_text(to_markdown(results))
    return results


def _summary(per_seed: list[dict]) -> dict:
    """Per run: the mean over seeds of each number, and the spread (max − min) of the loss."""
    summary = {}
    for name, *_ in RUNS:
        rows = [s["runs"][name] for s in per_seed]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss_before", "loss_after", "device_s", "cpr",
                                                                  "scored", "scoring_s")}
        mean["loss_after_spread"] = max(r["loss_after"] for r in rows) - min(r["loss_after"] for r in rows)
        summary[name] = mean
    return summary


def _verdict(summary: dict) -> str:
    """Which run wins on loss and on CPR, and the effect of each axis with the other held fixed."""
    loss = {name: s["loss_after"] for name, s in summary.items()}
    names = [name for name, *_ in RUNS]
    both, params_only, data_only, neither = names[:4]
    spread = max(s["loss_after_spread"] for s in summary.values())
    time_ratio = summary[both]["device_s"] / max(summary[params_only]["device_s"], 1e-12)
    return (f"Lowest held-out loss: {min(loss, key=loss.get)}; highest CPR: "
            f"{max(summary, key=lambda n: summary[n]['cpr'])}. Held-out loss gained by choosing the data by "
            f"influence instead of at random: {loss[params_only] - loss[both]:+.4f} nats with norm-selected "
            f"parameters, {loss[neither] - loss[data_only]:+.4f} with random ones; by choosing the parameters by "
            f"gradient norm instead of at random: {loss[data_only] - loss[both]:+.4f} with influence-chosen data, "
            f"{loss[neither] - loss[params_only]:+.4f} with random data (positive: the informed choice is "
            f"better; the largest range over seeds of one run's loss is {spread:.4f}). Scoring made the "
            f"influence-data runs take {time_ratio:.1f}x the device time of their random-data twins.")


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Parameter × data selection ({cfg['mode']} mode)", "",
             (f"TinyLM(context={cfg['context']}, width={cfg['width']}, layers={cfg['layers']}), pre-trained "
              f"{cfg['pretrain_steps']} AdamW steps on stdlib source, then {cfg['steps']} steps of batch "
              f"{cfg['batch']} on prose per run; parameter density {cfg['density']}, data fraction "
              f"{cfg['data_fraction']}, block size {cfg['block_size']}, reselect/rescore every "
              f"{cfg['refresh_every']} steps, lr {cfg['lr']}; seeds {cfg['seeds']} (means; ± half the range over "
              "seeds)."), "",
             "| run | held-out loss before | after | Δ | device-s | CPR (nats/device-h) | examples scored |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in results["summary"].items():
        spread = f" ±{s['loss_after_spread'] / 2:.4f}" if len(cfg["seeds"]) > 1 else ""  # half the range
        lines.append(f"| {name} | {s['loss_before']:.4f} | {s['loss_after']:.4f}{spread} | "
                     f"{s['loss_before'] - s['loss_after']:.4f} | {s['device_s']:.1f} | {s['cpr']:.1f} | "
                     f"{s['scored']:.0f} |")
    m = results["machine"]
    lines += ["", results["verdict"], "",
              (f"{results['date']}; {m['processor']}, {m['threads']} torch thread, torch {m['torch']}, sparse_grad "
               f"{m['sparse_grad']}; `{results['command']}` ({results['wall_s']:.0f} s). Device time is wall-clock "
               "on a shared machine: noisy."), ""]
    return "\n".join(lines)
