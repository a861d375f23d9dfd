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
    # 3 densities) and 4 optimizer steps (densities); the sparsify module's 18 (3 dense torch
    # steps, 3 optimizers x 4 sparsify cases, 3 SparseAdamW steps); the SGD/Lion module's 3 torch
    # baselines and per CPU backend 2 optimizers x 4 densities; plus 2 models x 5 data-selection
    # costs.
    cpu_backends = [b for b in ("reference", "cpp") if backends.unavailable_reason(b, torch.device("cpu")) is None]
    per_shape_set = 4 + 18 * len(cpu_backends) + 18 + 3 + 8 * len(cpu_backends)
    assert re.search(rf"\b{3 * per_shape_set + 10} passed\b", run.stdout), run.stdout[-2000:]


SOURCES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "sparse_grad", "triton_kernels", "csrc"]

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


def copy_sources(target: Path) -> Path:
    target.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(ROOT / name, target / name)
    return target


def pip_without_a_compiler(tmp_path, command: str, *args: str) -> None:
    """``pip <command>`` of a copy of the sources with no working compiler (CC/CXX fail)."""
    source = copy_sources(tmp_path / "src")
    env = {**os.environ, "CC": "false", "CXX": "false"}
    env.pop("SPARSE_GRAD_REQUIRE_NATIVE", None)
    run = subprocess.run([sys.executable, "-m", "pip", command, "-q", "--no-build-isolation", "--no-deps",
                          *args, str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_install_without_a_compiler_is_pure_python(tmp_path):
    """No working compiler: the install still succeeds, and backend="cpp" says what is missing."""
    pip_without_a_compiler(tmp_path, "install", "--target", str(tmp_path / "site"))
    assert not list((tmp_path / "site" / "sparse_grad").glob("_C*"))
    check = subprocess.run([sys.executable, "-c", NO_EXTENSION_SCRIPT], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-3000:]


def test_wheel_builds_with_the_project_metadata(tmp_path):
    """``pip wheel`` from pyproject.toml's [project] table: metadata, license, console script and
    package layout. Built without a compiler to bound the time (the native build is tested by
    the native tests and the install above)."""
    import email
    import zipfile

    import sparse_grad

    pip_without_a_compiler(tmp_path, "wheel", "-w", str(tmp_path / "wheels"))
    (wheel,) = (tmp_path / "wheels").glob("sparse_grad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"sparse_grad-{sparse_grad.__version__}.dist-info"
        meta = email.message_from_string(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert meta["Name"] == "sparse_grad" and meta["Version"] == sparse_grad.__version__
    assert meta["License-Expression"] == "Apache-2.0" and f"{info}/licenses/LICENSE" in names
    assert meta["Requires-Python"] == "<3.13,>=3.11"
    requires = meta.get_all("Requires-Dist")
    assert "torch<2.14,>=2.11" in requires and any(r.startswith("safetensors") for r in requires)
    assert {"test", "hf", "lightning", "bench", "plots", "energy", "progress"} <= set(meta.get_all("Provides-Extra"))
    assert meta.get_payload().lstrip().startswith("# sparse_grad")  # the README is the long description
    assert "sparse-grad = sparse_grad.cli:main" in entry_points
    assert "sparse_grad/triton_kernels/sparse_adamw.py" in names and "sparse_grad/cli/__init__.py" in names
    assert not any(n.startswith(("triton_kernels/", "tests/")) for n in names)


def test_installed_torch_and_python_are_in_the_declared_ranges():
    """The ranges say what was tested: the environment running the tests must be inside them."""
    from packaging.specifiers import SpecifierSet

    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sys.version.split()[0] in SpecifierSet(project["requires-python"])
    torch_spec = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch.__version__.split("+")[0] in SpecifierSet(torch_spec.removeprefix("torch"))


CONSOLE_SCRIPT = """
import sys
from sparse_grad.cli import main
sys.argv[0] = "/somewhere/bin/sparse-grad"  # as pip's console-script wrapper runs it
sys.exit(main())
"""


@pytest.mark.parametrize("command", [["-m", "sparse_grad"], ["-c", CONSOLE_SCRIPT]], ids=["module", "script"])
def test_console_script_runs_the_same_commands_as_python_m(command):
    prog = "python -m sparse_grad" if command[0] == "-m" else "sparse-grad"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    shown = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {prog} ")
    for name in ("demo", "analyze", "blueprint", "bench"):
        assert name in shown.stdout
    bad = subprocess.run([sys.executable, *command, "demo", "--quick", "--stage2-steps", "0"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "stage2_steps must be a positive int" in bad.stderr
