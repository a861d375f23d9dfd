"""What the demo writes: the console table, report.md, results.json, results.csv and the PNG plots.

Every number comes from :class:`~.experiment.DemoResults`; the verdicts compare differences with
their noise and say "tie" where the difference is inside it.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .experiment import TASKS, DemoResults, variant_names
from .stages import VariantResult

__all__ = ["Summary", "comparisons", "console_table", "summarize", "write_outputs"]

MIB = 2.0**20
NOISE_SIGMAS = 2.0  # a difference smaller than this many standard errors is reported as a tie
CSV_FIELDS = ("variant", "family", "density", "lr", "blueprint_weight", "repeats", "val_loss", "val_loss_stderr", "delta_vs_dense",
              "optimizer_ms", "step_ms", "state_mib", "footprint_mib", "peak_memory_mib", "trained_fraction",
              "device_s", "cpr_nats_per_device_hour", "cpr_vs_dense", "cpr_state_vs_dense", "mean_churn",
              "share_of_dense_gain")
# The issue's targets (share of dense AdamW's loss gain, each at its tuned lr) for norm selection.
TARGETS = {0.05: 0.90, 0.01: 0.75}



@dataclass
class Summary:
    """One variant, averaged over its repeats."""

    name: str
    family: str
    density: float | None
    runs: list[VariantResult]
    val_loss: float
    stderr: float  # over repeats if there are several, else over the validation batches
    stderr_source: str
    optimizer_ms: float
    step_ms: float
    state_bytes: int
    footprint_bytes: int
    peak_memory_bytes: float
    trained_fraction: float
    device_s: float  # training only
    state_gib_hours: float
    gain: float  # ΔΨ: start validation loss − final validation loss (nats)
    mean_churn: float | None
    cpr: float = math.nan  # ΔΨ per device-hour
    cpr_vs_dense: float = math.nan
    cpr_state_vs_dense: float = math.nan  # the same with Γ = optimizer-state GiB-hours
    share_of_dense_gain: float = math.nan  # gain / dense AdamW's gain

    @property
    def hyper(self) -> dict:
        return self.runs[0].hyper  # every repeat runs at the hyper-parameters chosen on the first

    def row(self, dense: Summary | None) -> dict:
        return {"variant": self.name, "family": self.family, "density": self.density,
                "lr": self.hyper.get("lr"), "blueprint_weight": self.hyper.get("blueprint_weight"),
                "repeats": len(self.runs),
                "val_loss": self.val_loss, "val_loss_stderr": self.stderr,
                "delta_vs_dense": self.val_loss - dense.val_loss if dense else math.nan,
                "optimizer_ms": self.optimizer_ms, "step_ms": self.step_ms, "state_mib": self.state_bytes / MIB,
                "footprint_mib": self.footprint_bytes / MIB, "peak_memory_mib": self.peak_memory_bytes / MIB,
                "trained_fraction": self.trained_fraction, "device_s": self.device_s,
                "cpr_nats_per_device_hour": self.cpr, "cpr_vs_dense": self.cpr_vs_dense,
                "cpr_state_vs_dense": self.cpr_state_vs_dense, "mean_churn": self.mean_churn,
                "share_of_dense_gain": self.share_of_dense_gain}


def summarize(results: DemoResults) -> list[Summary]:
    summaries = []
    for name in variant_names(results.variants):
        runs = [r for r in results.variants if r.name == name]
        losses = [r.val_loss for r in runs]
        if len(runs) > 1:
            stderr, source = statistics.stdev(losses) / math.sqrt(len(runs)), f"over {len(runs)} repeats"
        else:
            stderr, source = runs[0].val_stderr, f"over {len(runs[0].val_losses)} validation batches"
        churn = [c for r in runs for c in r.churn]
        device_s = statistics.fmean(r.resources["elapsed_s"] for r in runs)
        state_hours = statistics.fmean(r.resources["state_gib_hours"] for r in runs)
        gain = results.start_val_loss - statistics.fmean(losses)
        summaries.append(Summary(
            name=name, family=runs[0].family, density=runs[0].density, runs=runs, val_loss=statistics.fmean(losses),
            stderr=stderr, stderr_source=source, optimizer_ms=statistics.fmean(r.optimizer_ms for r in runs),
            step_ms=statistics.fmean(r.step_ms for r in runs), state_bytes=max(r.state_bytes for r in runs),
            footprint_bytes=max(r.footprint_bytes for r in runs),
            peak_memory_bytes=max(r.resources["peak_memory_gib"] for r in runs) * 2.0**30,
            trained_fraction=runs[0].trained_fraction, device_s=device_s, state_gib_hours=state_hours, gain=gain,
            mean_churn=statistics.fmean(churn) if churn else None,
            cpr=gain / (device_s / 3600.0) if device_s > 0 else math.nan))
    dense = next((s for s in summaries if s.family == "dense"), None)
    if dense is not None and dense.gain > 0:
        for s in summaries:
            s.share_of_dense_gain = s.gain / dense.gain
            s.cpr_vs_dense = s.cpr / dense.cpr
            if s.state_gib_hours > 0 and dense.state_gib_hours > 0:
                s.cpr_state_vs_dense = (s.gain / s.state_gib_hours) / (dense.gain / dense.state_gib_hours)
    return summaries


def paired_difference(a: Summary, b: Summary) -> tuple[float, float, str]:
    """``b − a`` in final validation loss, with its standard error: over repeats (paired by
    repeat) when there are several, else over the validation batches (paired by batch: both
    runs are evaluated on the same batches)."""
    pairs = list(zip(a.runs, b.runs))
    diffs = [rb.val_loss - ra.val_loss for ra, rb in pairs]
    if len(pairs) > 1:
        return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), f"{len(pairs)} repeats"
    per_batch = [lb - la for la, lb in zip(pairs[0][0].val_losses, pairs[0][1].val_losses)]
    return (statistics.fmean(per_batch), statistics.stdev(per_batch) / math.sqrt(len(per_batch)),
            f"{len(per_batch)} validation batches; training-seed noise not measured (--repeats 1)")


def verdict(a: Summary, b: Summary) -> dict:
    """Does ``a`` reach a lower final validation loss than ``b``, beyond the noise?"""
    diff, stderr, basis = paired_difference(a, b)
    if not stderr > 0:
        outcome = "identical" if diff == 0 else ("a" if diff > 0 else "b")
    elif abs(diff) < NOISE_SIGMAS * stderr:
        outcome = "tie"
    else:
        outcome = "a" if diff > 0 else "b"
    text = {"tie": f"tie: {a.name} and {b.name} differ by {abs(diff):.4f} nats, within {NOISE_SIGMAS:g} standard "
                   f"errors (SE {stderr:.4f})",
            "identical": f"{a.name} and {b.name} end with the same loss",
            "a": f"{a.name} is better by {diff:.4f} ± {stderr:.4f} nats ({diff / stderr if stderr else math.inf:.1f} SE)",
            "b": f"{b.name} is better by {-diff:.4f} ± {stderr:.4f} nats "
                 f"({-diff / stderr if stderr else math.inf:.1f} SE)"}[outcome]
    return {"a": a.name, "b": b.name, "b_minus_a": diff, "stderr": stderr, "basis": basis,
            "winner": {"a": a.name, "b": b.name}.get(outcome), "text": text}


def comparisons(summaries: Sequence[Summary]) -> list[dict]:
    """Norm vs random selection at every density (the control the idea must beat), blueprint vs
    norm, compact vs dense state, the fixed-layer baseline vs the closest-in-size sparse run,
    and the sparse runs vs dense AdamW."""
    by = {(s.family, s.density): s for s in summaries}
    out = []
    densities = sorted({s.density for s in summaries if s.family == "norm"})
    for d in densities:
        for other in ("random", "blueprint", "compact"):
            if (other, d) in by:
                out.append({"kind": f"norm vs {other}", "density": d, **verdict(by["norm", d], by[other, d])})
    dense = by.get(("dense", 1.0))
    if dense is not None:
        out += [{"kind": "dense vs norm", "density": d, **verdict(dense, by["norm", d])} for d in densities]
    for s in summaries:
        if s.family == "fixed-layer" and densities:
            d = min(densities, key=lambda x: abs(x - s.trained_fraction))
            out.append({"kind": "norm vs fixed-layer", "density": d, **verdict(by["norm", d], s)})
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _label(s: Summary) -> str:
    weight = s.hyper.get("blueprint_weight")
    return s.name if weight is None else f"{s.name} w={weight:g}"


def console_table(results: DemoResults, summaries: Sequence[Summary]) -> str:
    dense = next((s for s in summaries if s.family == "dense"), None)
    header = (f"{'variant':<24} {'lr':>6} {'val loss':>9} {'± SE':>7} {'vs dense':>9} {'gain %':>6} {'opt ms':>7} "
              f"{'step ms':>8} {'state MiB':>9} {'p+g+s MiB':>9} {'CPR/dense':>9} {'churn':>6}")
    lines = [(f"stage 2 ({TASKS[results.config.task]}) from the stage-1 weights (held-out loss "
             f"{results.start_val_loss:.3f} before adaptation), {results.config.stage2_steps} steps each, every "
             "variant at its lr (blueprint: blend weight) chosen on the tuning split:"), header, "-" * len(header)]
    for s in summaries:
        r = s.row(dense)
        lines.append(f"{_label(s):<24} {s.hyper['lr']:>6.3g} {s.val_loss:>9.4f} {s.stderr:>7.4f} "
                     f"{_fmt(r['delta_vs_dense'], '+9.4f'):>9} {_fmt(100 * s.share_of_dense_gain, '6.0f'):>6} "
                     f"{s.optimizer_ms:>7.2f} {s.step_ms:>8.1f} {s.state_bytes / MIB:>9.2f} "
                     f"{s.footprint_bytes / MIB:>9.2f} {_fmt(s.cpr_vs_dense, '9.2f'):>9} "
                     f"{_fmt(s.mean_churn, '6.2f'):>6}")
    return "\n".join(lines)


def _markdown_table(results: DemoResults, summaries: Sequence[Summary]) -> str:
    dense = next((s for s in summaries if s.family == "dense"), None)
    memory_label = "peak GPU MiB" if results.config.device.startswith("cuda") else "RSS MiB"
    lines = [(f"| variant | lr | val loss ± SE | vs dense | share of dense gain | optimizer ms | step ms | state MiB | "
              f"params+grads+state MiB | {memory_label} | trained | CPR vs dense | mean churn |"), "|---" * 13 + "|"]
    for s in summaries:
        r = s.row(dense)
        lines.append(f"| {_label(s)} | {s.hyper['lr']:g} | {s.val_loss:.4f} ± {s.stderr:.4f} | "
                     f"{_fmt(r['delta_vs_dense'], '+.4f')} | {_fmt(s.share_of_dense_gain, '.0%')} | "
                     f"{s.optimizer_ms:.2f} | {s.step_ms:.1f} | {s.state_bytes / MIB:.2f} | "
                     f"{s.footprint_bytes / MIB:.2f} | {s.peak_memory_bytes / MIB:.0f} | {s.trained_fraction:.0%} | "
                     f"{_fmt(s.cpr_vs_dense, '.2f')} | {_fmt(s.mean_churn, '.2f')} |")
    return "\n".join(lines)


def target_finding(verdict_vs_dense: dict, dense: Summary) -> str:
    """Is norm selection's share of dense's gain at or above the issue's target at its density?
    The share's standard error is the paired difference's over dense's gain."""
    d = verdict_vs_dense["density"]
    share = 1.0 - verdict_vs_dense["b_minus_a"] / dense.gain
    se = verdict_vs_dense["stderr"] / dense.gain
    target = TARGETS[d]
    met = "met" if share >= target else "not met"
    return (f"Target at density {d:g} ({target:.0%} of dense AdamW's gain, each at its tuned lr): {met}: norm "
            f"selection recovered {share:.1%} ± {se:.1%} ({verdict_vs_dense['basis']}).")


def stage1_stop(results: DemoResults) -> str:
    """Where stage 1 ended and why, read off the stopper's returns."""
    s1, cfg = results.stage1, results.config
    returns = [None] * (len(s1.curve) - len(s1.cpr)) + s1.cpr
    if s1.stopped_by == "stopper":
        last = [f"{r:.2f}" for r in returns[-cfg.stopper_patience:]]
        steps = [str(p["step"]) for p in s1.curve[-cfg.stopper_patience:]]
        return (f"Stage 1 stopped at step {s1.steps} (cap {cfg.stage1_steps}) because its marginal return fell "
                f"below eta={cfg.stopper_eta:g} nats per million training tokens at {cfg.stopper_patience} "
                f"consecutive checks: {', '.join(last)} at steps {', '.join(steps)} (each over the last "
                f"{cfg.stopper_window} checks).")
    seen = [r for r in returns if r is not None]
    lowest = f"; the lowest windowed return was {min(seen):.2f}" if seen else ""
    return (f"Stage 1 ran to its step cap ({s1.steps}) without the stopper firing (eta={cfg.stopper_eta:g} nats per "
            f"million tokens, patience {cfg.stopper_patience}{lowest}).")


def findings(results: DemoResults, summaries: Sequence[Summary], verdicts: Sequence[dict]) -> list[str]:
    """Plain statements of what this run found, read off the numbers."""
    out = [stage1_stop(results)]
    dense = next((s for s in summaries if s.family == "dense"), None)
    if dense is not None:
        out.append(f"Dense AdamW (lr {dense.hyper['lr']:g}) lowered the held-out loss from "
                   f"{results.start_val_loss:.3f} to {dense.val_loss:.3f} in {results.config.stage2_steps} steps.")
    out += [target_finding(v, dense) for v in verdicts if v["kind"] == "dense vs norm" and v["density"] in TARGETS
            and dense is not None and dense.gain > 0]
    for v in verdicts:
        if v["kind"] == "norm vs random":
            out.append(f"Density {v['density']:g}, norm-based vs random selection: {v['text']}.")
    for v in verdicts:
        if v["kind"] in ("norm vs blueprint", "norm vs compact", "norm vs fixed-layer"):
            out.append(f"Density {v['density']:g}, {v['kind']}: {v['text']}.")
    out += [sparse_backward_finding(a, b) for a, b in twins(summaries)]
    fastest = min((s for s in summaries if s.family != "dense"), key=lambda s: s.optimizer_ms, default=None)
    if dense is not None and fastest is not None:
        out.append(f"Optimizer step: dense AdamW {dense.optimizer_ms:.2f} ms; the fastest other variant, "
                   f"{fastest.name}, {fastest.optimizer_ms:.2f} ms. A whole step takes "
                   f"{min(s.step_ms for s in summaries):.0f}-{max(s.step_ms for s in summaries):.0f} ms (median per "
                   "variant): forward and backward dominate at this model size, so CPR by device-hours mostly "
                   "follows the loss gain.")
    ranked = sorted((s for s in summaries if s.family != "dense" and math.isfinite(s.cpr_vs_dense)),
                    key=lambda s: s.cpr_vs_dense, reverse=True)
    if ranked:
        above = [s.name for s in ranked if s.cpr_vs_dense > 1]
        out.append(f"CPR relative to dense AdamW (loss gained per device-hour of training): "
                   f"{ranked[-1].cpr_vs_dense:.2f} ({ranked[-1].name}) to {ranked[0].cpr_vs_dense:.2f} "
                   f"({ranked[0].name}); " + (f"above dense: {', '.join(above)}." if above else
                                              "none is above dense."))
    # Variants that do the same work per step (full backward, dense state) should take the same
    # time; when they do not, the machine's load changed between runs and time-based numbers carry it.
    same_work = [s.step_ms for s in summaries if s.family in ("dense", "norm", "random", "blueprint")]
    if same_work and max(same_work) > 1.3 * min(same_work):
        out.append(f"Machine load varied during the run: variants with the same work per step took "
                   f"{min(same_work):.0f} to {max(same_work):.0f} ms per step, so the time-based columns (step ms, "
                   "CPR vs dense) carry that noise; the loss comparisons do not (same steps, same batches).")
    return out


def twins(summaries: Sequence[Summary]) -> list[tuple[Summary, Summary]]:
    """(variant, its twin): pairs that train to the same numbers at different cost (sparse_backward)."""
    by_name = {s.name: s for s in summaries}
    pairs = []
    for s in summaries:
        twin_of = s.runs[0].twin_of
        if twin_of is not None and twin_of in by_name:
            pairs.append((by_name[twin_of], s))
    return pairs


def sparse_backward_finding(plain: Summary, with_sb: Summary) -> str:
    """What computing only the selected blocks' weight gradients saved: the loss should not move
    (the same numbers up to GEMM summation order); the step time and CPR should."""
    same = ("the same held-out loss" if abs(with_sb.val_loss - plain.val_loss) <= 1e-3 * abs(plain.val_loss) else
            f"held-out loss {plain.val_loss:.4f} vs {with_sb.val_loss:.4f} (they should agree: a defect)")
    cpr = (f"; CPR vs dense {plain.cpr_vs_dense:.2f} → {with_sb.cpr_vs_dense:.2f}"
           if math.isfinite(plain.cpr_vs_dense) and math.isfinite(with_sb.cpr_vs_dense) else "")
    return (f"sparse_backward ({with_sb.name} vs {plain.name}): {same}; median step {plain.step_ms:.1f} → "
            f"{with_sb.step_ms:.1f} ms ({plain.step_ms / with_sb.step_ms:.2f}× the speed){cpr}. Between "
            "reselections the Linear layers compute only the selected blocks' weight gradients; reselection "
            "steps compute them all.")


def write_markdown(path: Path, results: DemoResults, summaries: Sequence[Summary], verdicts: Sequence[dict],
                   plots: Sequence[Path]) -> None:
    cfg, env, s1 = results.config, results.environment, results.stage1
    overall = s1.report.overall
    fit = overall.power_law
    memory_what = ("torch.cuda.max_memory_allocated over the training steps (peak)" if cfg.device.startswith("cuda")
                   else "the process's resident set (RSS) sampled after every step, maximum over the run: it "
                        "includes the torch runtime and every earlier run's allocator caches, so it is not a per-"
                        "variant figure; the params+grads+state column is the per-variant memory")
    lines = [
        "# sparse_grad demo: two-stage pretrain → blueprint → sparse adaptation", "",
        (f"Run {env['date_utc']} on {env['machine']} ({env['device']}, {env['torch_threads']} torch thread(s), "
        f"{env['cpu_count']} CPUs), torch {env['torch']}, sparse_grad {env['sparse_grad']}, SparseAdamW backend "
        f"`{env['backend']}`. Command: `{env['command']}`. Total time {results.elapsed_s:.0f} s."), "",
        "## Setup", "",
        (f"- Model: byte-level transformer (`sparse_grad.demo.TinyLM`), width {cfg.width}, {cfg.layers} layers, "
        f"{cfg.heads} heads, context {cfg.context}; {sum(t.numel() for t in s1.state.values()):,} parameters; "
        f"blocks of {cfg.block_size} elements ({overall.num_blocks:,} blocks)."),
        f"- Stage 1 data: {results.data['stage1']}. Stage 2 data: {results.data['stage2']}.",
        (f"- Batches of {cfg.batch} random windows; validation on {cfg.val_batches} fixed held-out batches, the same "
        "for every evaluation."), "",
        "## Stage 1: dense pretraining on Python source", "",
        (f"torch AdamW (lr {cfg.stage1_lr:g}) with a `GradientMonitor` and a `ResourceMeter`; every {cfg.check_every} "
        f"steps the validation loss went to a `MarginalReturnStopper(window={cfg.stopper_window}, "
        f"eta={cfg.stopper_eta:g}, patience={cfg.stopper_patience})` (Ψ = −validation loss, Γ = million training "
        "tokens — compute for this model, the same on any machine, so the stop does not depend on machine load; "
        f"eta in nats per million tokens). {stage1_stop(results)} Training loss {s1.train_loss_start:.3f} → "
        f"validation loss {s1.curve[-1]['val_loss']:.3f}, {s1.resources['elapsed_s']:.1f} s of training."),
        "",
        "| step | train loss | val loss | training s | marginal return (nats per million tokens) |", "|---|---|---|---|---|"]
    returns = [None] * (len(s1.curve) - len(s1.cpr)) + s1.cpr
    for point, ret in zip(s1.curve, returns):
        lines.append(f"| {point['step']} | {point['train_loss']:.3f} | {point['val_loss']:.3f} | "
                     f"{point['device_s']:.1f} | {_fmt(ret, '.2f')} |")
    lines += ["", f"Gradient concentration over the stage (mean block scores): the top 10% of blocks hold "
              f"{overall.top_shares[0.1]:.0%} of the mass and the top 20% {overall.top_shares[0.2]:.0%}; Gini "
              f"{overall.gini:.2f}" + (f"; the top {fit.tail_blocks} ranked norms follow norm ∝ rank^−{fit.alpha:.2f} "
                                       f"(KS distance {fit.ks:.3f})" if fit else "; no power-law tail was fitted")
              + f". These statistics are the mean over the stage; the blueprint "
              f"(`{Path(s1.blueprint_path).name}`) records an exponential moving average of the block scores "
              f"(factor {cfg.blueprint_beta:g}: mostly the last ~{1 / (1 - cfg.blueprint_beta):.0f} steps). The "
              f"stage's mean recommends density {overall.recommended_density:.3f} for {overall.target_share:.0%} of "
              "the mass.", "",
              "![heavy tail](heavy_tail.png)", "",
              f"## Stage 2: {TASKS[cfg.task]}", "",
              f"Every variant starts from the stage-1 weights (held-out loss {results.start_val_loss:.3f} before "
              f"adaptation), sees the same {cfg.stage2_steps} batches (weight decay {cfg.weight_decay:g}), and is "
              f"evaluated every {cfg.eval_every} steps on the held-out split"
              + (f"; each ran {cfg.repeats} times with different batch orders (and random draws)"
                 if cfg.repeats > 1 else "") + ". " + TUNING_TEXT.format(
                  lrs=", ".join(f"{cfg.stage2_lr * m:g}" for m in cfg.lr_multipliers),
                  weights=", ".join(f"{w:g}" for w in cfg.blueprint_weights)) + recorded_text(results), "",
              _markdown_table(results, summaries), "",
              "Columns: *lr* — the learning rate chosen on the tuning split (*w* — the blueprint's blend weight "
              "chosen there); *val loss ± SE* — final loss on the held-out split, standard error "
              + (f"over the {cfg.repeats} repeats" if cfg.repeats > 1 else
                 f"over the {cfg.val_batches} validation batches (evaluation noise only: one training run each)")
              + "; *optimizer ms* — median time of `optimizer.step()` alone; *step ms* — median time of forward, "
              "backward and step (perf_counter, CUDA synchronized); *state MiB* — bytes of the optimizer's state "
              "tensors (the dense layout keeps AdamW-sized moments plus per-block step counts; the compact layout "
              "keeps moments for the selected blocks only); *params+grads+state MiB* — after the first step "
              "(frozen parameters have no grads); "
              f"*{'peak GPU' if cfg.device.startswith('cuda') else 'RSS'} MiB* — {memory_what}; *trained* — "
              "share of the parameters the optimizer holds (sparse variants update density × blocks of them per "
              "step); *CPR vs dense* — compute per resource CPR = ΔΨ/ΔΓ of the variant over that of dense "
              "AdamW, with Ψ = −validation loss (ΔΨ = loss at the start − final loss) and Γ = device-hours of "
              "the training steps measured by `sparse_grad.cpr.ResourceMeter` (evaluations excluded); "
              "results.json also has it with Γ = optimizer-state GiB-hours (`cpr_state_vs_dense`); *mean churn* — "
              "share of the selected blocks that were not selected at the step before, mean over the steps "
              "(read from the optimizer's selection after each step).", "",
              "*share of dense gain* — (start − loss) / (start − dense AdamW's loss).", "",
              "### Hyper-parameter grids (first repeat)", "",
              "| variant | searched | grid: value → tuning loss / held-out loss | chosen |", "|---|---|---|---|"]
    lines += [_grid_row(c) for c in results.tuning]
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings(results, summaries, verdicts)]
    lines += ["", (f"Differences count as real when they exceed {NOISE_SIGMAS:g} standard errors of the paired "
              "difference; otherwise the report calls them a tie."), "", "| comparison | density | result | basis |",
              "|---|---|---|---|"]
    lines += [f"| {v['kind']} | {v['density']:g} | {v['text']} | {v['basis']} |" for v in verdicts]
    dense = next((s for s in summaries if s.family == "dense"), None)
    if dense is not None and dense.gain <= 0:
        lines += ["", "Dense AdamW did not lower the validation loss, so CPR relative to dense is undefined."]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", ("Files: `results.json` (everything, including every curve), `results.csv` (the table), "
              "`stage1_blueprint.safetensors`, `stage1_model.pt`"
              + (", `tuning.json` (the grids, reusable with `--tuning`)." if results.tuning_recorded is None else
                 ".")), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


TUNING_TEXT = ("Each variant ran at every learning rate of the grid {lrs} (dense AdamW included) and keeps "
               "the run with the lowest loss on the tuning split, a part of the stage-2 data disjoint from both "
               "the training and the held-out bytes; blueprint-guided selection and compact state take the lr "
               "chosen for norm selection at their density (the same update rule), and the blueprint variants "
               "choose their blend weight from {weights} the same way; a variant with sparse_backward trains to "
               "the numbers of the same optimizer without it and runs once at that one's choice. The table "
               "reports the chosen runs.")


def recorded_text(results: DemoResults) -> str:
    rec = results.tuning_recorded
    if rec is None:
        return (" This run searched every grid and wrote them to `tuning.json`, which a run of the same "
                "settings can reuse (`--tuning`).")
    return (f" The choices are those of a recorded run of the same settings ({rec.get('date_utc')}, "
            f"{rec.get('machine')}, torch {rec.get('torch')}): this run trained each variant once, at its recorded "
            "choice, and the grids below are the recording's; `--retune` searches them again (about three times "
            "the stage-2 time).")


def _grid_row(choice) -> str:
    entry = choice.as_dict()
    key = choice.searched
    grid = entry["grid"]
    if key:
        cells = ", ".join(f"{g['hyper'][key]:g} → {g['tune_loss']:.4f} / {g['val_loss']:.4f}" for g in grid)
    else:
        cells = f"{grid[0]['tune_loss']:.4f} / {grid[0]['val_loss']:.4f}" if grid else "-"
    chosen = ", ".join(f"{k} {v:g}" for k, v in choice.chosen.hyper.items())
    twin = choice.chosen.twin_of
    searched = key or (f"none (trains to the numbers of {twin})" if twin else "none (norm selection's lr)")
    return f"| {choice.name} | {searched} | {cells} | {chosen} |"


def write_outputs(results: DemoResults, out_dir: Path) -> tuple[str, list[Path]]:
    """Write report.md, results.json, results.csv and the plots; return the console table and the files."""
    from .plots import save_all

    summaries = summarize(results)
    verdicts = comparisons(summaries)
    dense = next((s for s in summaries if s.family == "dense"), None)
    plots = save_all(results, summaries, out_dir)
    data = results.as_dict()
    data["summary"] = [s.row(dense) for s in summaries]
    data["comparisons"] = verdicts
    data["findings"] = findings(results, summaries, verdicts)
    (out_dir / "results.json").write_text(json.dumps(_json_ready(data), indent=1, allow_nan=False), encoding="utf-8")
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for s in summaries:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for k, v in s.row(dense).items()})
    write_markdown(out_dir / "report.md", results, summaries, verdicts, plots)
    table = console_table(results, summaries)
    text = table + "\n\n" + "\n".join(f"- {f}" for f in findings(results, summaries, verdicts))
    files = [out_dir / n for n in ("report.md", "results.json", "results.csv")] + plots
    return text, files


def _json_ready(value):
    """NaN and infinities become None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value

