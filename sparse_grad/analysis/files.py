"""safetensors files with a JSON header: the format of monitor dumps and blueprints.

Tensors are stored under their keys; the JSON document travels in the safetensors metadata
under one key that names the kind of file (``"sparse_grad.blueprint"``, ...), so any safetensors
reader can open the file and a file of another kind is recognized as such.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["load_tensors", "save_tensors"]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, header: dict) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) and ``header`` as JSON under ``kind``."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    cpu = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_file(cpu, str(path), metadata={kind: json.dumps(header, allow_nan=False)})
    return path


def load_tensors(path: str | os.PathLike, kind: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`; ``what`` names the kind in error messages."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in list(f.keys())}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file, so not a {what}: {err}") from None
    if kind not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a {what} (no {kind!r} metadata)")
    try:
        header = json.loads(metadata[kind])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the {what} header must be a JSON object, got {type(header).__name__}")
    return tensors, header
