"""Backends behind the ``sparse_grad`` ops, and how ``backend="auto"`` chooses one (DESIGN §1).

A backend is a module with ``block_sqnorms``, ``select_blocks`` and ``sparse_adamw_step``, all
with the reference backend's signatures.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from .._checks import choice

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


def check_backend(backend, name: str = "backend") -> str:
    return choice(backend, BACKENDS, name)


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


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why the concrete backend ``backend`` cannot run on ``device``, or ``None`` if it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        return triton_unavailable_reason(device)
    from . import native
    return native.unavailable_reason(backend, device)


# What backend="auto" tries, in order, per device type (DESIGN §1); the reference always runs.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}


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
    """The module implementing the concrete backend ``backend``."""
    if backend == "reference":
        from . import reference
        return reference
    if backend == "triton":
        from . import triton_backend
        return triton_backend
    if backend in ("cpp", "cuda"):
        from . import native
        return native
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
