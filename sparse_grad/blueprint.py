"""Gradient blueprints: which blocks carried the gradient mass in a first training stage, saved
so that a second stage can reuse that knowledge (``SparseAdamW(..., blueprint=bp)``).

A blueprint holds one fp32 score vector per parameter (its blocks' accumulated gradient mass,
keyed by parameter name) and metadata. On disk it is a safetensors file — the score vectors as
tensors named like the parameters — whose JSON header (safetensors metadata key
``"sparse_grad.blueprint"``) holds:

``format_version``   1 (a newer file is refused with a clear message)
``block_size``       elements per block the scores were taken with
``parameters``       ``[{name, shape, dtype, num_blocks}]`` in the model's order
``fingerprint``      sha256 of the (name, shape, dtype) list: equal fingerprints, same model layout
``steps``, ``accumulate``, ``provenance``   how the scores came about
``statistics``       the heavy-tail statistics of the whole model and each submodule
                     (:mod:`sparse_grad.analysis.stats`)
``recommendations``  per submodule (and overall): the smallest ``k`` of its blocks that holds
                     ``target_share`` of its gradient mass, and ``density = k / blocks``
``target_share``, ``depth``, ``sparse_grad_version``
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import torch

from . import __version__, _checks, ops, targeting
from .analysis.files import load_tensors, save_tensors
from .analysis.monitor import GradientMonitor, GradientSnapshot
from .analysis.params import look_up, trainable_parameters
from .analysis.report import ROOT, HeavyTailReport, heavy_tail_report, module_of

__all__ = ["FORMAT_VERSION", "Blueprint", "model_fingerprint"]

FORMAT_VERSION = 1
KIND = "sparse_grad.blueprint"
SCOPES = ("global", "tensor")


def model_fingerprint(names: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> str:
    """sha256 (hex) of the ordered ``(name, shape, dtype)`` list of a model's parameters."""
    listing = [[n, [int(d) for d in s], str(t)] for n, s, t in zip(names, shapes, dtypes)]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _header_parameters(h, path) -> list[dict]:
    """The header's parameter list, its required keys present with the right types (a forged or
    truncated header is a ValueError naming the file, not a KeyError)."""
    missing = [key for key in ("parameters", "block_size", "steps") if key not in h]
    if missing:
        raise ValueError(f"{path}: the blueprint header lacks {', '.join(map(repr, missing))}")
    params = h["parameters"]
    if not isinstance(params, list) or not params:
        raise ValueError(f"{path}: the blueprint header's 'parameters' must be a non-empty list")
    for i, p in enumerate(params):
        if (not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("dtype"), str)
                or not isinstance(p.get("shape"), list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in p["shape"])):
            raise ValueError(f"{path}: the blueprint header's parameters[{i}] must have a str 'name', a str "
                             f"'dtype' and a 'shape' list of non-negative ints, got {p!r}"[:300])
    return params


class Blueprint:
    """Per-block gradient mass of a model's parameters, with its statistics and metadata.

    Usually made by :meth:`from_monitor` and :meth:`load`; the constructor takes the parts.

    Args:
        scores: ``{parameter name: 1-D block scores}`` in the model's parameter order; each of
            ``ceil(numel / block_size)`` finite, non-negative values.
        block_size: elements per block.
        shapes, dtypes: ``{name: shape}`` and ``{name: dtype name}`` of the parameters.
        steps: training steps the scores summarize.
        accumulate: how they were accumulated (``"mean"``, ``"ema(beta=0.9)"``, ``"combined"``).
        provenance: free-form lines on where the scores came from (kept in the file).
        target_share: share of a submodule's mass its recommended ``k`` must hold.
        depth: submodule depth for statistics and recommendations (None: the owning module).
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], *, block_size: int, shapes: Mapping[str, Sequence[int]],
                 dtypes: Mapping[str, str], steps: int = 0, accumulate: str = "", provenance: Sequence[str] = (),
                 target_share: float = 0.9, depth: int | None = None):
        self.block_size = _checks.positive_int(block_size, "block_size")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise TypeError(f"steps must be a non-negative int, got {steps!r}")
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError("scores must be a non-empty mapping of parameter name to block scores")
        self.scores: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name, value in scores.items():
            if name not in shapes or name not in dtypes:
                raise ValueError(f"no shape or dtype given for parameter {name!r}")
            shape = tuple(int(d) for d in shapes[name])
            expected = (_numel(shape) + self.block_size - 1) // self.block_size
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() != expected:
                raise ValueError(f"scores[{name!r}] must be a 1-D tensor of {expected} block scores (shape {shape}, "
                                 f"block_size {self.block_size}), got {getattr(value, 'shape', type(value).__name__)}")
            value = value.detach().to("cpu", torch.float32).contiguous().clone()
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"scores[{name!r}] must be finite and >= 0 (sums of squares)")
            self.scores[name], self.shapes[name], self.dtypes[name] = value, shape, str(dtypes[name])
        self.steps = int(steps)
        self.accumulate = str(accumulate)
        self.provenance = [str(line) for line in provenance]
        self.report: HeavyTailReport = heavy_tail_report(
            self.scores, depth=depth, target_share=target_share, block_size=self.block_size,
            steps=self.steps, accumulate=self.accumulate or None)
        self.target_share = self.report.target_share
        self.depth = depth
        self._bound: dict[int, str] | None = None
        self._bound_params: list[torch.Tensor] = []  # keeps the ids in _bound valid

    # -- making one ------------------------------------------------------------------------------

    @classmethod
    def from_monitor(cls, monitor: GradientMonitor | GradientSnapshot, *, target_share: float = 0.9,
                     depth: int | None = None) -> Blueprint:
        """The blueprint of what a :class:`~sparse_grad.analysis.GradientMonitor` (or a snapshot
        of one, e.g. a loaded monitor dump) has accumulated."""
        if isinstance(monitor, GradientMonitor):
            monitor = monitor.snapshot()
        if not isinstance(monitor, GradientSnapshot):
            raise TypeError(f"monitor must be a GradientMonitor or GradientSnapshot, got {type(monitor).__name__}")
        if monitor.steps == 0:
            raise ValueError("the monitor has recorded no steps: nothing to make a blueprint of")
        return cls(monitor.scores, block_size=monitor.block_size, shapes=dict(zip(monitor.names, monitor.shapes)),
                   dtypes=dict(zip(monitor.names, monitor.dtypes)), steps=monitor.steps,
                   accumulate=monitor.accumulate, provenance=[f"monitor: {monitor.steps} steps, {monitor.accumulate}"],
                   target_share=target_share, depth=depth)

    def _derived(self, scores: dict[str, torch.Tensor], *, block_size: int | None = None, steps: int | None = None,
                 accumulate: str | None = None, provenance: str) -> Blueprint:
        return Blueprint(scores, block_size=block_size or self.block_size, shapes=self.shapes, dtypes=self.dtypes,
                         steps=self.steps if steps is None else steps,
                         accumulate=self.accumulate if accumulate is None else accumulate,
                         provenance=[*self.provenance, provenance], target_share=self.target_share, depth=self.depth)

    # -- what it holds ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.scores)

    @property
    def num_blocks(self) -> int:
        return sum(s.numel() for s in self.scores.values())

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.names, [self.shapes[n] for n in self.names], [self.dtypes[n] for n in self.names])

    def recommendations(self) -> dict:
        """``{"overall": {...}, "modules": {path: {...}}}`` with ``k``, ``density``,
        ``num_blocks`` and ``target_share``: the smallest number of blocks holding
        ``target_share`` of the group's gradient mass."""
        def rec(s):
            return {"k": s.recommended_k, "num_blocks": s.num_blocks,
                    "density": None if math.isnan(s.recommended_density) else s.recommended_density,
                    "target_share": s.target_share}
        return {"overall": rec(self.report.overall), "modules": {m: rec(s) for m, s in self.report.modules.items()}}

    def header(self) -> dict:
        """The JSON header written to the file (see the module docstring)."""
        stats = self.report.as_dict()
        return {
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "parameters": [{"name": n, "shape": list(self.shapes[n]), "dtype": self.dtypes[n],
                            "num_blocks": self.scores[n].numel()} for n in self.names],
            "fingerprint": self.fingerprint,
            "steps": self.steps,
            "accumulate": self.accumulate,
            "provenance": self.provenance,
            "target_share": self.target_share,
            "depth": self.depth,
            "statistics": {"overall": stats["overall"], "modules": stats["modules"]},
            "recommendations": self.recommendations(),
            "sparse_grad_version": __version__,
        }

    def describe(self, *, per_tensor: bool = False) -> str:
        """A printable summary: metadata, recommendations per submodule, heavy-tail report."""
        rec = self.recommendations()
        title = (f"blueprint format {FORMAT_VERSION}: {len(self.scores)} parameters, {self.num_blocks:,} blocks "
                 f"of {self.block_size} elements; {self.steps} steps ({self.accumulate or 'unknown'})")
        lines = [title, f"fingerprint {self.fingerprint}"]
        lines += [f"  {line}" for line in self.provenance]
        lines.append(f"recommended: {rec['overall']['k']:,} blocks (density {rec['overall']['density'] or 0:.4f}) hold "
                     f"{self.target_share:.0%} of the mass; per submodule:")
        width = max(len(m or ROOT) for m in rec["modules"])
        for module, r in rec["modules"].items():
            lines.append(f"  {module or ROOT:<{width}}  k = {r['k']:>6} of {r['num_blocks']:>6}  "
                         f"density {r['density'] or 0:.3f}")
        return "\n".join(lines) + "\n\n" + self.report.to_text(per_tensor=per_tensor)

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the blueprint as a safetensors file with the JSON header."""
        save_tensors(path, self.scores, KIND, self.header())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Blueprint:
        """Read a blueprint written by :meth:`save`."""
        tensors, h = load_tensors(path, KIND, "sparse_grad blueprint")
        version = h.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ValueError(f"{path}: blueprint format version {version!r}; this sparse_grad ({__version__}) "
                             f"reads versions 1..{FORMAT_VERSION}")
        params = _header_parameters(h, path)
        names = [p["name"] for p in params]
        for name in names:
            if name not in tensors:
                raise ValueError(f"{path}: the header lists parameter {name!r}, but the file has no scores for it")
        extra = [key for key in tensors if key not in set(names)]
        if extra:
            raise ValueError(f"{path}: the file has scores for {extra[0]!r}, which the header does not list")
        try:
            bp = cls({n: tensors[n] for n in names}, block_size=h["block_size"],
                     shapes={p["name"]: p["shape"] for p in params}, dtypes={p["name"]: p["dtype"] for p in params},
                     steps=h["steps"], accumulate=h.get("accumulate", ""), provenance=h.get("provenance", []),
                     target_share=h.get("target_share", 0.9), depth=h.get("depth"))
        except (TypeError, ValueError) as err:  # a header edited by hand: say which file
            raise ValueError(f"{path}: the blueprint header does not describe a blueprint: {err}") from None
        if h.get("fingerprint") != bp.fingerprint:
            raise ValueError(f"{path}: the fingerprint in the header does not match its parameter list "
                             "(the file was altered)")
        return bp

    # -- matching a model ------------------------------------------------------------------------

    def validate(self, model: torch.nn.Module, *, block_size: int | None = None) -> None:
        """Raise a ``ValueError`` naming the first mismatch between the blueprint and ``model``'s
        trainable parameters: a parameter the blueprint lacks, one the model lacks, a shape, or
        (if given) the block size. Dtypes may differ: scores do not depend on them."""
        named = trainable_parameters(model)
        if block_size is not None and _checks.positive_int(block_size, "block_size") != self.block_size:
            raise ValueError(f"the blueprint has block_size {self.block_size}, not {block_size}; re-block it "
                             f"explicitly with blueprint.reblock({block_size})")
        model_names = {n for n, _ in named}
        for name, p in named:
            if name not in self.scores:
                raise ValueError(f"the blueprint does not fit the model: it has no scores for the model's "
                                 f"parameter {name!r}")
        for name in self.names:
            if name not in model_names:
                raise ValueError(f"the blueprint does not fit the model: its parameter {name!r} is not a trainable "
                                 "parameter of the model")
        for name, p in named:
            if tuple(p.shape) != self.shapes[name]:
                raise ValueError(f"the blueprint does not fit the model: parameter {name!r} has shape "
                                 f"{tuple(p.shape)} in the model, {self.shapes[name]} in the blueprint")

    def param_groups(self, model: torch.nn.Module, target_modules: str | Sequence[str] | None = None, *,
                     min_sparse_size: int = targeting.DEFAULT_MIN_SPARSE_SIZE, weight_decay: float = 0.01,
                     no_decay: Sequence[str] | None = None) -> list[dict]:
        """:func:`sparse_grad.param_groups` with each submodule's density from
        :meth:`recommendations` (the submodules at the blueprint's ``depth``; a submodule
        without gradient mass gets the overall density), and ``block_size`` set to the
        blueprint's in every group, so that ``SparseAdamW(groups, blueprint=bp)`` can blend it.

        ``target_modules``, ``min_sparse_size``, ``weight_decay`` and ``no_decay`` are as
        there; parameters the blueprint has no scores for are left out and frozen too (a
        targeted one raises a ``ValueError`` naming it).
        """
        targeting._check_model(model)
        target = targeting._target_matcher(target_modules)
        for name, p in model.named_parameters():
            if p.requires_grad and target(name):
                if name not in self.scores:
                    raise ValueError(f"the blueprint has no scores for the targeted parameter {name!r}")
                if tuple(p.shape) != self.shapes[name]:
                    raise ValueError(f"the blueprint does not fit the model: parameter {name!r} has shape "
                                     f"{tuple(p.shape)} in the model, {self.shapes[name]} in the blueprint")
        recommended = self.recommendations()
        overall = recommended["overall"]["density"] or 1.0
        modules = {m: r["density"] or overall for m, r in recommended["modules"].items()}

        def density_of(name: str) -> float:
            return modules.get(module_of(name, self.depth), overall)
        return targeting._groups(model, target, density_of, min_sparse_size, weight_decay, no_decay,
                                 {"block_size": self.block_size})

    def bind(self, model: torch.nn.Module) -> Blueprint:
        """Remember which tensor of ``model`` has which name, so that an optimizer given
        ``model.parameters()`` (without names) can use the blueprint. Checks the model with
        :meth:`validate` first; returns ``self``."""
        self.validate(model)
        named = list(model.named_parameters())
        self._bound = {id(p): n for n, p in named}
        self._bound_params = [p for _, p in named]
        return self

    def block_scores(self, params: Sequence[torch.Tensor], names: Sequence[str] | None,
                     block_size: int) -> torch.Tensor:
        """The blueprint's scores of ``params``' blocks, concatenated (fp32, on their device):
        what SparseAdamW blends into its selection. ``names`` are the params' names (None:
        look them up in the model given to :meth:`bind`)."""
        params = list(params)
        if block_size != self.block_size:
            raise ValueError(f"the blueprint was recorded with block_size {self.block_size}, the param group uses "
                             f"{block_size}: re-block it explicitly with blueprint.reblock({block_size})")
        if names is None:
            if self._bound is None:
                raise ValueError("the blueprint cannot tell which parameter is which: build the optimizer from "
                                 "model.named_parameters(), or call blueprint.bind(model) first")
            names = look_up(params, self._bound, "params", "a parameter of the model the blueprint is bound to")
        if len(names) != len(params):
            raise ValueError(f"{len(names)} names for {len(params)} params")
        for name, p in zip(names, params):
            if name not in self.scores:
                raise ValueError(f"the blueprint has no scores for parameter {name!r}")
            if tuple(p.shape) != self.shapes[name]:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}, the blueprint recorded "
                                 f"{self.shapes[name]}")
        if not params:
            return torch.empty(0, dtype=torch.float32)
        return torch.cat([self.scores[n] for n in names]).to(params[0].device)

    # -- using it --------------------------------------------------------------------------------

    def to_mask(self, density: float, scope: str = "global", *, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
        """``{name: bool [num_blocks]}``: the blocks a selection at ``density`` would update.

        ``scope="global"`` keeps the ``ceil(density · n)`` highest-scoring blocks of the whole
        model, ``"tensor"`` those of every parameter, exactly like SparseAdamW with
        ``blueprint_weight=1`` (ties to the lower block id in the blueprint's parameter order)."""
        density = _checks.density(density, "density")
        scope = _checks.choice(scope, SCOPES, "scope")
        sizes = [s.numel() for s in self.scores.values()]
        scores = torch.cat(list(self.scores.values())).to(device or "cpu")
        ids = ops.select_blocks(scores, density=density, segments=sizes if scope == "tensor" else None)
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[ids] = True
        return dict(zip(self.names, mask.split(sizes)))

    @classmethod
    def combine(cls, blueprints: Sequence[Blueprint], weights: Sequence[float] | None = None) -> Blueprint:
        """A weighted mean of blueprints of the same model and block size.

        Each blueprint's scores are first divided by its total mass, so blueprints of runs whose
        gradients had different scales weigh by ``weights`` alone (default: equally); the
        result's scores are shares of mass (they sum to 1). Its steps are the sum."""
        if isinstance(blueprints, Blueprint) or not isinstance(blueprints, Sequence) or not blueprints:
            raise TypeError("blueprints must be a non-empty list of Blueprint")
        for i, bp in enumerate(blueprints):
            if not isinstance(bp, Blueprint):
                raise TypeError(f"blueprints[{i}] must be a Blueprint, got {type(bp).__name__}")
        if weights is None:
            weights = [1.0] * len(blueprints)
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a list of numbers, got {type(weights).__name__}")
        if len(weights) != len(blueprints):
            raise ValueError(f"weights has {len(weights)} entries for {len(blueprints)} blueprints")
        weights = [_checks.non_negative(w, f"weights[{i}]") for i, w in enumerate(weights)]
        if sum(weights) <= 0:
            raise ValueError("weights must not all be 0")
        first = blueprints[0]
        for i, bp in enumerate(blueprints[1:], start=1):
            if bp.block_size != first.block_size:
                raise ValueError(f"blueprints[{i}] has block_size {bp.block_size}, blueprints[0] {first.block_size}: "
                                 f"re-block one of them first (blueprint.reblock)")
            for name in first.names:
                if name not in bp.shapes:
                    raise ValueError(f"blueprints[{i}] has no scores for parameter {name!r}, blueprints[0] has")
                if bp.shapes[name] != first.shapes[name]:
                    raise ValueError(f"parameter {name!r} has shape {bp.shapes[name]} in blueprints[{i}], "
                                     f"{first.shapes[name]} in blueprints[0]")
            for name in bp.names:
                if name not in first.shapes:
                    raise ValueError(f"blueprints[{i}] has scores for parameter {name!r}, blueprints[0] has not")
        totals = [sum(float(s.double().sum()) for s in bp.scores.values()) for bp in blueprints]
        for i, total in enumerate(totals):
            if total <= 0:
                raise ValueError(f"blueprints[{i}] holds no gradient mass (all scores are 0)")
        weight_sum = sum(weights)
        combined = {name: sum((w / weight_sum / total) * bp.scores[name].double()
                              for bp, w, total in zip(blueprints, weights, totals)).float()
                    for name in first.names}
        return first._derived(combined, steps=sum(bp.steps for bp in blueprints), accumulate="combined",
                              provenance=f"combined {len(blueprints)} blueprints with weights "
                                         f"{[round(w / weight_sum, 6) for w in weights]}")

    def reblock(self, block_size: int) -> Blueprint:
        """The blueprint at another block size.

        A new block's score is the mass the old blocks it overlaps put into it, taking each old
        block's mass as spread evenly over its elements. When the new size is a multiple of the
        old one, new blocks are unions of whole old blocks and the result is exact (what the
        same gradients would have scored); otherwise it is that even-spread estimate. Each
        parameter's total mass is kept either way."""
        block_size = _checks.positive_int(block_size, "block_size")
        if block_size == self.block_size:
            return self._derived(dict(self.scores), provenance="re-blocked to the same block size")
        rescored = {name: _reblock(scores.double(), _numel(self.shapes[name]), self.block_size, block_size).float()
                    for name, scores in self.scores.items()}
        exact = block_size % self.block_size == 0
        return self._derived(rescored, block_size=block_size,
                             provenance=f"re-blocked {self.block_size} -> {block_size} "
                                        f"({'exact' if exact else 'mass spread evenly within old blocks'})")


def _reblock(scores: torch.Tensor, numel: int, old: int, new: int) -> torch.Tensor:
    """Scores over blocks of ``new`` elements from scores over blocks of ``old`` (fp64)."""
    if numel == 0:
        return scores.new_zeros(0)
    cumulative = torch.cat([scores.new_zeros(1), scores.cumsum(0)])  # mass before each old block
    sizes = torch.full_like(scores, float(old))
    sizes[-1] = numel - old * (scores.numel() - 1)
    edges = torch.arange(0, numel + new, new, dtype=torch.int64).clamp_max(numel)  # new block boundaries
    edges = torch.unique_consecutive(edges)
    block = (edges // old).clamp_max(scores.numel() - 1)
    mass_before = cumulative[block] + (edges - block * old).to(scores.dtype) * scores[block] / sizes[block]
    return (mass_before[1:] - mass_before[:-1]).clamp_min(0.0)
