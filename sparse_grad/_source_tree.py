"""``python -m sparse_grad`` run in a clone's root imports the clone's sources, not the installed
package (Python puts the current directory first on ``sys.path``). The sources lack what the
install builds, the native extension ``sparse_grad._C``, so the ``cpp`` and ``cuda`` backends
would be missing and ``backend="auto"`` would fall back to ``reference`` on a CPU.
:func:`installed_instead` finds the installed package in that case;
``python -m sparse_grad`` then runs the command again with ``python -P`` (no current directory on
``sys.path``), on the installed package.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["installed_instead"]


def _built(package_dir: Path) -> bool:
    return any(package_dir.glob("_C.*"))


def installed_instead(package_dir: Path, search_path: Sequence[str]) -> Path | None:
    """The directory of another ``sparse_grad`` package, found on ``search_path`` (or by an import
    hook such as an editable install's), that has the native extension built, if the package at
    ``package_dir`` has none; else None."""
    package_dir = Path(package_dir).resolve()
    if _built(package_dir):
        return None
    saved = sys.path[:]
    sys.path[:] = list(search_path)
    try:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec("sparse_grad", None) if find_spec is not None else None
            if spec is not None and spec.submodule_search_locations:
                break
        else:
            return None
    finally:
        sys.path[:] = saved
    other = Path(next(iter(spec.submodule_search_locations))).resolve()
    return other if other != package_dir and _built(other) else None
