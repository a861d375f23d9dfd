"""``python -m sparse_grad`` in a clone's root (README command 1 runs the demo there) must run on
the installed package, with its native extension, not on the clone's unbuilt sources."""
import shutil
import subprocess
import sys
from pathlib import Path

import sparse_grad
from sparse_grad._source_tree import installed_instead

EXTENSION = "_C.cpython-311-x86_64-linux-gnu.so"


def _package(root: Path, built: bool) -> Path:
    package = root / "sparse_grad"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if built:
        (package / EXTENSION).write_bytes(b"")
    return package


def test_installed_instead_finds_a_built_package_only_for_unbuilt_sources(tmp_path):
    before = list(sys.path)
    sources = _package(tmp_path / "clone", built=False)
    site = _package(tmp_path / "site", built=True)
    assert installed_instead(sources, [str(tmp_path / "site")]) == site.resolve()
    assert installed_instead(site, [str(tmp_path / "clone")]) is None  # built here: stay
    _package(tmp_path / "plain", built=False)  # a pure-Python install: nothing better
    assert installed_instead(sources, [str(tmp_path / "plain")]) is None
    assert installed_instead(sources, [str(tmp_path / "clone")]) is None  # only itself
    assert sys.path == before


def test_python_m_in_a_source_tree_runs_the_installed_package(tmp_path):
    installed = Path(sparse_grad.__file__).resolve().parent
    clone = tmp_path / "clone"
    shutil.copytree(installed, clone / "sparse_grad",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__", "triton_kernels"))
    run = subprocess.run([sys.executable, "-m", "sparse_grad", "demo", "--help"], cwd=clone, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: python -m sparse_grad demo" in run.stdout
    switched = "holds the sources without the built native extension" in run.stderr
    # the installed package has the extension unless it was installed without a compiler
    assert switched == any(installed.glob("_C.*")), run.stderr
