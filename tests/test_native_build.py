"""The CMake build of csrc/: the CPU kernels as a library that registers sparse_grad's op schemas
when loaded, and every CUDA source compiled by nvcc for sm_80 and sm_90 (also without a CUDA
torch, so that a CUDA compile error fails CI on a machine without a GPU)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from _utils import assert_script_prints_ok

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake")
    nvcc = shutil.which("nvcc")
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if nvcc:  # a machine with nvcc must compile the CUDA sources: no silent skip
        configure += ["-DSPARSE_GRAD_REQUIRE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    for command in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    return build, nvcc is not None


def test_cuda_sources_compile_for_sm80_and_sm90(cmake_build):
    build, with_nvcc = cmake_build
    if not with_nvcc:
        pytest.skip("nvcc is not installed")
    archive = build / "libsparse_grad_cuda_kernels.a"
    assert archive.exists()
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:  # not every nvcc install has it: then look for the embedded arch names
        contents = archive.read_bytes()
        assert b"sm_80" in contents and b"sm_90" in contents
    else:
        listing = subprocess.run([cuobjdump, "--list-elf", str(archive)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        for arch in ("sm_80", "sm_90"):
            assert arch in listing.stdout, listing.stdout


def test_cuda_sources_include_no_torch_header():
    sources = [*(ROOT / "csrc" / "cuda").glob("*.cu"), *(ROOT / "csrc" / "cuda").glob("*.cuh"),
               ROOT / "csrc" / "cuda" / "kernels.h"]
    for source in sources:
        for line in source.read_text().splitlines():
            if line.startswith("#include"):
                assert not any(x in line for x in ("torch/", "ATen/", "c10/")), f"{source.name}: {line}"


CPU_LIBRARY_SCRIPT = """
import torch
import sparse_grad.library  # defines the op schemas the library implements
from sparse_grad import ops
torch.ops.load_library({library!r})
tensors = [torch.randn(n) for n in (37, 4096, 1)]
got = torch.ops.sparse_grad.native_block_sqnorms(tensors, 16)
torch.testing.assert_close(got, ops.block_sqnorms(tensors, 16, backend="reference"), rtol=2e-6, atol=0)
print("ok")
"""


def test_cmake_cpu_library_registers_the_kernels(cmake_build, tmp_path):
    build, _ = cmake_build
    library = build / "libsparse_grad_cpu.so"
    assert library.exists()
    assert_script_prints_ok(CPU_LIBRARY_SCRIPT.format(library=str(library)), cwd=tmp_path)
