"""The whole demo: stage 1 (dense pretraining on Python source, blueprint), then every stage-2
variant from the same stage-1 weights with the same batches and step budget, each at its own
hyper-parameters chosen on a tuning split (:mod:`.tuning`), on one of two tasks: English prose
(a domain shift) or other modules of the standard library (near stage 1's domain)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__, _checks, backends
from ..backends import resolve
from ..blueprint import Blueprint
from ..cpr import MarginalReturnStopper
from .data import batches, prose_bytes, stdlib_bytes, train_tune_test_split, train_val_split
from .model import TinyLM
from .stages import Stage1Result, VariantResult, run_stage1, run_variant
from .tuning import Choice, check_grid, recorded_choices, rerun, tune, write_recording
from .variants import Variant, standard_variants

__all__ = ["SIZES", "TASKS", "DemoConfig", "DemoResults", "Stage2Setup", "config_for", "prepare", "run_demo"]

# Stage-2 tasks and their titles: the stage-1 model (trained on the first source_bytes of the
# standard library's source) is adapted to prose (a domain shift) or to the source after those
# bytes (other modules: near stage 1's domain).
TASKS = {"prose": "adaptation to English prose", "code": "adaptation to other standard-library modules"}


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides what the demo computes (written into results.json)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch: int = 16
    block_size: int = 256
    source_bytes: int = 1_000_000  # of the standard library's source (stage 1)
    prose_bytes: int = 500_000  # stage-2 bytes: of pydoc_data.topics (it has about 465 KB) or of later stdlib source
    task: str = "prose"  # stage 2: "prose" or "code" (TASKS)
    # The cap, above where the stopper fires: on the default setting the held-out loss plateaus
    # near 2.3 (returns 0.64-0.68) before falling fast again (about 1.0-1.3 to step 650), and
    # the returns first stay under eta=0.5 at steps 900-950 (docs/low_density_study.md).
    stage1_steps: int = 1500
    stage1_lr: float = 3e-3
    check_every: int = 50  # stage 1: validation + stopper check
    stopper_window: int = 3
    stopper_patience: int = 2
    stopper_eta: float = 0.5  # Ψ (nats of val loss) per million training tokens
    stage2_steps: int = 150
    stage2_lr: float = 2e-3  # the base of the lr grid
    lr_multipliers: tuple[float, ...] = (1.0, 3.0, 10.0)  # every variant's lr grid: stage2_lr times these
    blueprint_weights: tuple[float, ...] = (0.25, 0.5, 0.75)  # the blueprint variants' blend-weight grid
    blueprint_beta: float = 0.98  # stage 1 records the blueprint as an EMA of the block scores (late steps)
    error_feedback: bool = False  # SparseAdamW variants keep the unapplied gradient (docs/low_density_study.md)
    eval_every: int = 25
    val_batches: int = 16  # validation batches of `batch` windows, fixed for every evaluation
    weight_decay: float = 0.01
    densities: tuple[float, ...] = (0.01, 0.05, 0.2)
    compact_density: float | None = 0.05
    # Norm selection every `reselect_every` steps at this density, without and with sparse_backward
    # (None: neither): what computing only the selected blocks' weight gradients saves end to end.
    interval_density: float | None = 0.05
    reselect_every: int = 10
    fixed_last_layers: int = 1
    repeats: int = 1  # stage-2 runs per variant, with different batch orders (and random draws)
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    threads: int = 1


# Model and budget presets (--size); --quick shrinks the step counts further.
SIZES = {
    "small": {},  # the CPU default
    "medium": {"width": 256, "layers": 4, "heads": 8, "context": 128, "batch": 32, "block_size": 1024,
               "stage1_steps": 2000, "stage2_steps": 500, "eval_every": 50, "check_every": 100},
    "large": {"width": 512, "layers": 6, "heads": 8, "context": 256, "batch": 32, "block_size": 4096,
              "stage1_steps": 4000, "stage2_steps": 1000, "eval_every": 100, "check_every": 200},
}
QUICK = {"width": 64, "layers": 2, "heads": 2, "context": 32, "batch": 8, "block_size": 128, "stage1_steps": 120,
         "check_every": 30, "stage2_steps": 40, "eval_every": 10, "val_batches": 8, "source_bytes": 300_000,
         "prose_bytes": 200_000, "lr_multipliers": (1.0, 10.0), "blueprint_weights": (0.5,)}


def config_for(size: str = "small", quick: bool = False, **overrides) -> DemoConfig:
    """The preset ``size`` (``--quick``: a tiny model and few steps), then ``overrides``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    # None means "the preset's value" (unset CLI options), except for compact_density and
    # interval_density, where it means "no such run".
    chosen = {**SIZES[size], **(QUICK if quick else {}),
              **{k: v for k, v in overrides.items() if v is not None or k in ("compact_density", "interval_density")}}
    return replace(DemoConfig(), **chosen)


def check_config(cfg: DemoConfig) -> None:
    for name in ("width", "layers", "heads", "context", "batch", "block_size", "source_bytes", "prose_bytes",
                 "stage1_steps", "check_every", "stopper_window", "stopper_patience", "stage2_steps", "eval_every",
                 "val_batches", "repeats", "threads"):
        _checks.positive_int(getattr(cfg, name), name)
    if cfg.val_batches < 2:
        raise ValueError(f"val_batches must be at least 2 (for a standard error), got {cfg.val_batches}")
    if not cfg.densities or not all(0.0 < d < 1.0 for d in cfg.densities):
        raise ValueError(f"densities must be in (0, 1), got {cfg.densities!r}")
    for name in ("compact_density", "interval_density"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    _checks.positive_int(cfg.reselect_every, "reselect_every")
    if cfg.reselect_every < 2:
        raise ValueError(f"reselect_every must be at least 2 (1 is the norm variants), got {cfg.reselect_every}")
    _checks.choice(cfg.task, tuple(TASKS), "task")
    check_grid(cfg.lr_multipliers, "lr_multipliers")
    _checks.flag(cfg.error_feedback, "error_feedback")
    check_grid(cfg.blueprint_weights, "blueprint_weights", _checks.unit_interval)
    _checks.beta(cfg.blueprint_beta, "blueprint_beta")
    if not 0 <= cfg.fixed_last_layers <= cfg.layers:
        raise ValueError(f"fixed_last_layers must be in [0, layers={cfg.layers}], got {cfg.fixed_last_layers}")
    if cfg.width % cfg.heads:
        raise ValueError(f"width ({cfg.width}) must be a multiple of heads ({cfg.heads})")
    for name in ("stage1_lr", "stage2_lr", "stopper_eta"):
        _checks.positive(getattr(cfg, name), name)
    _checks.non_negative(cfg.weight_decay, "weight_decay")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {cfg.device!r}, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {cfg.device!r}")
    backends.resolve(_checks.choice(cfg.backend, backends.BACKENDS, "backend"), device)  # raises if it cannot run


@dataclass
class DemoResults:
    config: DemoConfig
    environment: dict
    data: dict
    stage1: Stage1Result
    start_val_loss: float  # stage-1 weights on the stage-2 held-out batches
    variants: list[VariantResult]  # every reported run (repeats included), in the order run
    elapsed_s: float
    tuning: list[Choice] = field(default_factory=list)  # every variant's grid (first repeat)
    tuning_recorded: dict | None = None  # where and when the reused recording was made (None: searched here)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "environment": self.environment, "data": self.data,
                "stage1": self.stage1.summary(), "stage2_start_val_loss": self.start_val_loss,
                "stage2": [v.as_dict() for v in self.variants], "tuning": [c.as_dict() for c in self.tuning],
                "tuning_recorded": self.tuning_recorded, "elapsed_s": self.elapsed_s}


def environment(cfg: DemoConfig, started: datetime.datetime) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),  # when the run started
            "machine": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "backend": resolve(cfg.backend, device),
            "python": platform.python_version(), "torch": torch.__version__, "sparse_grad": __version__,
            "platform": platform.platform(), "command": " ".join(["python -m sparse_grad", *sys.argv[1:]])
            if Path(sys.argv[0]).name in ("__main__.py", "sparse_grad") else " ".join(sys.argv)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Stage2Setup:
    """What every stage-2 run shares: the stage-1 result and blueprint, the stage-2 data split
    three ways (training, tuning, held out), and fresh copies of the stage-1 model."""

    cfg: DemoConfig
    data: dict
    stage1: Stage1Result
    blueprint: Blueprint
    train: torch.Tensor  # stage-2 training bytes
    tune_batches: list[Batch]  # hyper-parameters are chosen on these
    val_batches: list[Batch]  # held out: the reported losses

    def make_model(self) -> TinyLM:
        cfg = self.cfg
        fresh = TinyLM(cfg.context, width=cfg.width, layers=cfg.layers, heads=cfg.heads)
        fresh.load_state_dict(self.stage1.state)
        return fresh.to(cfg.device)

    def run(self, variant: Variant, repeat: int = 0, *, progress: bool = False, label: str | None = None,
            steps: int | None = None) -> VariantResult:
        """``variant`` from the stage-1 weights on the batches of ``repeat`` (each repeat another order)."""
        cfg = self.cfg
        steps = steps or cfg.stage2_steps
        train = batches(self.train, steps, cfg.batch, cfg.context, seed=cfg.seed + 100 + repeat)
        return run_variant(variant, self.make_model, train, self.val_batches, steps=steps,
                           eval_every=min(cfg.eval_every, steps), device=torch.device(cfg.device), seed=repeat,
                           progress=progress, label=label, tune_batches=self.tune_batches)


def stage2_bytes(cfg: DemoConfig) -> tuple[torch.Tensor, str]:
    if cfg.task == "prose":
        return prose_bytes(cfg.prose_bytes), "English prose (pydoc_data.topics)"
    # The bytes right after stage 1's: other modules (in name order), the same language and style.
    return (stdlib_bytes(cfg.prose_bytes, skip=cfg.source_bytes),
            "Python standard-library source after stage 1's bytes (other modules)")


def prepare(cfg: DemoConfig, out_dir: Path, *, progress: bool = True, stage1: Stage1Result | None = None
            ) -> Stage2Setup:
    """Stage 1 (writes the blueprint and the weights into ``out_dir``) and the stage-2 data;
    ``stage1``: a finished stage 1 of the same config (its blueprint in ``out_dir``) to reuse, so
    that two stage-2 tasks start from the same weights."""
    check_config(cfg)
    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)

    source_train, source_val = train_val_split(stdlib_bytes(cfg.source_bytes))
    text, what = stage2_bytes(cfg)
    train, tune_split, held_out = train_tune_test_split(text)
    data = {"stage1": f"Python standard-library source: {source_train.numel():,} bytes train, "
                      f"{source_val.numel():,} held out",
            "stage2": f"{what}: {train.numel():,} bytes train, {tune_split.numel():,} for choosing hyper-parameters "
                      f"(tuning split), {held_out.numel():,} held out (the reported losses)",
            "task": cfg.task}

    def val_set(data_val: torch.Tensor, seed: int) -> list:
        return list(batches(data_val, cfg.val_batches, cfg.batch, cfg.context, seed=seed))

    if stage1 is None:
        stage1 = _stage1(cfg, out_dir, source_train, val_set(source_val, cfg.seed + 2), progress)
    return Stage2Setup(cfg=cfg, data=data, stage1=stage1,
                       blueprint=Blueprint.load(out_dir / "stage1_blueprint.safetensors"), train=train,
                       tune_batches=val_set(tune_split, cfg.seed + 4), val_batches=val_set(held_out, cfg.seed + 3))


def _stage1(cfg: DemoConfig, out_dir: Path, source_train: torch.Tensor, val_batches: list, progress: bool
            ) -> Stage1Result:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg.context, width=cfg.width, layers=cfg.layers, heads=cfg.heads).to(device)
    stopper = MarginalReturnStopper(window=cfg.stopper_window, eta=cfg.stopper_eta, patience=cfg.stopper_patience)
    stage1 = run_stage1(model, batches(source_train, cfg.stage1_steps, cfg.batch, cfg.context, seed=cfg.seed + 1),
                        val_batches, steps=cfg.stage1_steps, lr=cfg.stage1_lr,
                        weight_decay=cfg.weight_decay, block_size=cfg.block_size, check_every=cfg.check_every,
                        stopper=stopper, blueprint_path=out_dir / "stage1_blueprint.safetensors", device=device,
                        blueprint_beta=cfg.blueprint_beta, progress=progress)
    torch.save(stage1.state, out_dir / "stage1_model.pt")
    return stage1


def run_demo(cfg: DemoConfig, out_dir: Path, *, progress: bool = True, retune: bool = False,
             tuning: Path | None = None) -> DemoResults:
    """Run both stages; writes the blueprint into ``out_dir`` (the report is :mod:`.report`'s).

    Stage 2 runs every variant once at its recorded choice where a recording of this config
    exists (``tuning``: its path; default: the packaged recording of the default demo;
    :func:`~.tuning.recorded_choices`), else, or with ``retune``, every variant's grid, and then
    writes ``tuning.json`` into ``out_dir`` (a recording a later run can reuse). Every variant's
    grid runs on the first repeat's batches; further repeats rerun the choice."""
    # timezone.utc, not datetime.UTC: Python 3.10 is supported
    started, started_at = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
    _checks.flag(retune, "retune")
    if retune and tuning is not None:
        raise ValueError("retune=True searches every grid: it takes no tuning recording")
    setup = prepare(cfg, out_dir, progress=progress)
    variants = standard_variants(cfg.densities, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay,
                                 block_size=cfg.block_size, blueprint=setup.blueprint, backend=cfg.backend,
                                 compact_density=cfg.compact_density, fixed_last=cfg.fixed_last_layers,
                                 error_feedback=cfg.error_feedback, interval_density=cfg.interval_density,
                                 reselect_every=cfg.reselect_every)
    recorded = None if retune else recorded_choices(cfg, variants, tuning)
    runs = len(variants) if recorded else search_runs(variants, cfg)
    done = 0

    def run(variant: Variant, repeat: int = 0) -> VariantResult:
        nonlocal done
        done += 1
        label = f"stage 2 [{done}/{runs + (cfg.repeats - 1) * len(variants)}] {variant.name} " + ", ".join(
            f"{k} {v:g}" for k, v in variant.hyper.items()) + (f" (repeat {repeat + 1})" if repeat else "")
        return setup.run(variant, repeat, progress=progress, label=label)

    if recorded:
        choices, recorded_at = rerun(variants, run, recorded[0]), recorded[1]
    else:
        choices, recorded_at = tune(variants, run, lr_multipliers=cfg.lr_multipliers,
                                    blueprint_weights=cfg.blueprint_weights), None
    results = [c.chosen for c in choices]
    for repeat in range(1, cfg.repeats):
        for choice in choices:
            chosen = next(v for v in variants if v.name == choice.name).with_hyper(**choice.chosen.hyper)
            results.append(run(chosen, repeat))
    start_val = statistics.fmean(r.curve[0]["val_loss"] for r in results)
    env = environment(cfg, started_at)
    if recorded_at is None:
        write_recording(out_dir / "tuning.json", cfg, env, choices)
    return DemoResults(config=cfg, environment=env, data=setup.data, stage1=setup.stage1,
                       start_val_loss=start_val, variants=results, elapsed_s=time.perf_counter() - started,
                       tuning=choices, tuning_recorded=recorded_at)


def search_runs(variants: Sequence[Variant], cfg: DemoConfig) -> int:
    """How many stage-2 runs searching every grid takes (for the progress labels)."""
    grid = len(cfg.lr_multipliers)
    return sum(1 if v.twin_of is not None or (v.family == "compact" and v.density in cfg.densities) else
               len(cfg.blueprint_weights) if v.family == "blueprint" else grid for v in variants)


def default_threads() -> int:
    """Torch threads for a CPU run: leave one core to the rest of the machine (on a 2-core
    machine two torch threads ran this model's steps several times slower than one whenever
    another process used a core), at most 4 (the model is too small to use more)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def variant_names(results: Sequence[VariantResult]) -> list[str]:
    """Distinct variant names in the order first run."""
    return list(dict.fromkeys(r.name for r in results))
