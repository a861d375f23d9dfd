"""Backends behind the ``sparse_grad`` ops, and how ``backend="auto"`` chooses one (docs/design.md §1).

A backend is a module with ``block_sqnorms``, ``select_blocks`` and the updates
``sparse_adamw_step``, ``sparse_sgd_step`` and ``sparse_lion_step``, all
with the reference backend's signatures.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from .._checks import choice

def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels() -> ModuleType:
    """Import ``sparse_grad.triton_kernels``.

    An installed package has it as a subpackage; a source checkout keeps it in the top-level
    folder ``triton_kernels/``, which is loaded under the same name so that both behave alike.
    """
    name = "sparse_grad.triton_kernels"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "triton_kernels")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None:
        raise ModuleNotFoundError(f"no module named {name!r} (and no triton_kernels/ next to the package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# Looked up once at import: torch.compile traces into functools.cache wrappers and refuses
# importlib's find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or ``None`` if it can."""
    if not _TRITON_INSTALLED:
        return "the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "in the environment before sparse_grad's Triton kernels are imported")
    return f"the Triton backend supports CUDA tensors (and CPU tensors when interpreted), not {device.type}"


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs, why it cannot, and how ``backend="auto"`` ranks it.

    ``module`` names the module implementing the kernels (:data:`KERNEL_NAMES`, with the
    reference backend's signatures); ``auto_priority`` maps a device type to its rank among the
    backends ``"auto"`` tries there (lower first; absent: never chosen automatically).
    """

    name: str
    device_types: tuple[str, ...]
    module: str
    auto_priority: dict = field(default_factory=dict)
    reason: Callable[[str, torch.device], str | None] = lambda name, device: None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type not in self.device_types:
            return f"backend={self.name!r} runs on {' or '.join(self.device_types)} tensors, not {device.type}"
        return self.reason(self.name, device)


def _triton_reason(name: str, device: torch.device) -> str | None:
    return triton_unavailable_reason(device)


def _native_reason(name: str, device: torch.device) -> str | None:
    from . import native
    return native.unavailable_reason(name, device)


# The one registry: every concrete backend, in the order they are listed to users. The
# reference always runs, and is what "auto" falls back to.
REGISTRY = {b.name: b for b in (
    Backend("reference", ("cpu", "cuda", "meta"), "reference"),
    Backend("triton", ("cuda", "cpu"), "triton_backend", {"cuda": 0}, _triton_reason),
    Backend("cpp", ("cpu",), "native", {"cpu": 0}, _native_reason),
    Backend("cuda", ("cuda",), "native", {"cuda": 1}, _native_reason),
)}
BACKENDS = ("auto", *REGISTRY)
# What "auto" tries, in order, per device type (derived from the registry).
AUTO_ORDER = {device: tuple(sorted((b.name for b in REGISTRY.values() if device in b.auto_priority),
                                   key=lambda name: REGISTRY[name].auto_priority[device]))
              for device in ("cuda", "cpu")}
# The entry points through which an optimizer step reaches a backend's kernels.
KERNEL_NAMES = ("block_sqnorms", "select_blocks", "sparse_adamw_step", "sparse_sgd_step", "sparse_lion_step")


def check_backend(backend, name: str = "backend") -> str:
    return choice(backend, BACKENDS, name)


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why the concrete backend ``backend`` cannot run on ``device``, or ``None`` if it can."""
    return REGISTRY[backend].unavailable_reason(device)


def resolve(backend: str, device: torch.device | None) -> str:
    """The concrete backend for tensors on ``device``; raises if the one asked for cannot run."""
    check_backend(backend)
    if device is None:  # nothing to compute on
        return "reference"
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def get(backend: str) -> ModuleType:
    """The module implementing the concrete backend ``backend`` (its :data:`KERNEL_NAMES`)."""
    module = _MODULES.get(backend)
    if module is None:
        entry = REGISTRY.get(backend)
        if entry is None:
            raise ValueError(f"unknown backend {backend!r}; expected one of {tuple(REGISTRY)}")
        module = _MODULES[backend] = importlib.import_module(f"{__name__}.{entry.module}")
    return module


_MODULES: dict[str, ModuleType] = {}
