"""Install layout, the README's commands, and the benchmark suite's ability to run."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_grad import backends

ROOT = Path(__file__).resolve().parent.parent


def installed_files():
    try:
        return importlib.metadata.files("sparse_grad")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(installed_files() is None, reason="sparse_grad is not pip-installed here (source checkout)")
def test_triton_kernels_install_inside_the_package():
    paths = {str(f).replace("\\", "/") for f in installed_files()}
    assert "sparse_grad/triton_kernels/__init__.py" in paths
    assert "sparse_grad/triton_kernels/sparse_adamw.py" in paths
    assert not any(p.startswith("triton_kernels/") for p in paths), "the bare name belongs to another package"


def test_ci_runs_the_readme_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-commands -->\s*```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"


def test_benchmark_suite_runs():
    """Each benchmark case runs once at a tiny size and checks its output, so the suite cannot rot."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "-p", "no:cacheprovider",
         "--quick", "--benchmark-disable"],
        cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Per shape set (3): read, copy, 2 torch AdamW, and per CPU backend 4 norm-pass cases
    # (2 dtypes x 2 block sizes), 4 selections (2 densities x 2 scopes), 6 updates (2 dtypes x
    # 3 densities) and 4 optimizer steps (densities); plus 2 models x 5 data-selection costs.
    cpu_backends = [b for b in ("reference", "cpp") if backends.unavailable_reason(b, torch.device("cpu")) is None]
    assert re.search(rf"\b{3 * (4 + 18 * len(cpu_backends)) + 10} passed\b", run.stdout), run.stdout[-2000:]


SOURCES = ["setup.py", "pyproject.toml", "README.md", "sparse_grad", "triton_kernels", "csrc"]

NO_EXTENSION_SCRIPT = """
import torch
import sparse_grad
from sparse_grad import backends, ops
assert not hasattr(sparse_grad, "_C")
assert backends.resolve("auto", torch.device("cpu")) == "reference"
try:
    ops.block_sqnorms([torch.ones(3)], 2, backend="cpp")
except RuntimeError as err:
    assert "sparse_grad._C is not available" in str(err) and "reinstall" in str(err), err
else:
    raise AssertionError("backend='cpp' ran without the extension")
print("ok")
"""


def test_install_without_a_compiler_is_pure_python(tmp_path):
    """No working compiler: the install still succeeds, and backend="cpp" says what is missing."""
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "CC": "false", "CXX": "false"}
    env.pop("SPARSE_GRAD_REQUIRE_NATIVE", None)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                          "--target", str(tmp_path / "site"), str(source)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not list((tmp_path / "site" / "sparse_grad").glob("_C*"))
    check = subprocess.run([sys.executable, "-c", NO_EXTENSION_SCRIPT], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-3000:]
