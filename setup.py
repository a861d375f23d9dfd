"""Installs sparse_grad; the top-level folder triton_kernels/ becomes sparse_grad.triton_kernels.

The native kernels in csrc/ become the extension ``sparse_grad._C``: the CPU kernels always, the
CUDA kernels when torch has CUDA and nvcc is found. They are built against the torch installed in
the environment being installed into; without that torch, or without a compiler, sparse_grad
installs as pure Python and ``backend="cpp"``/``"cuda"`` say why they are missing. Set
``SPARSE_GRAD_REQUIRE_NATIVE=1`` to make a failed native build fail the install instead.
"""
import os
import re
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "sparse_grad" / "__init__.py").read_text()).group(1)
# No fused multiply-add unless written out (the kernels match torch's rounding step by step);
# vectorizable sqrt; OpenMP for at::parallel_for (torch's own libgomp is the one loaded).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
# Target GPUs: torch's choice (TORCH_CUDA_ARCH_LIST, else the visible GPUs); CMake pins sm_80/90.
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _import_torch():
    """torch from the environment being installed into, or None.

    pip's isolated build environment hides that environment's site-packages; they are appended
    to the path (after the build environment's own) so that the extension is built against the
    torch it will run with and no second torch is installed for the build.
    """
    try:
        import torch
    except ImportError:
        target = sysconfig.get_paths()["purelib"]
        if target in sys.path:
            return None
        sys.path.append(target)
        try:
            import torch
        except ImportError:
            return None
    return torch


def _native_build():
    """(ext_modules, cmdclass) for sparse_grad._C, or ([], {}) where it cannot be built."""
    torch = _import_torch()
    if torch is None:
        print("sparse_grad: torch is not installed in the target environment; installing without "
              "the native kernels (pure-Python backends only)", file=sys.stderr)
        return [], {}
    from torch.utils import cpp_extension

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds sparse_grad._C; where that fails, warns and installs without it."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure leaves pure Python
                if os.environ.get("SPARSE_GRAD_REQUIRE_NATIVE") == "1":
                    raise
                print(f"sparse_grad: building the native kernels failed ({err}); installing "
                      "without them (pure-Python backends only)", file=sys.stderr)

    sources = ["csrc/module.cpp", *sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc" / "cpu").glob("*.cpp"))]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("SPARSE_GRAD_NO_CUDA") != "1")
    if with_cuda:
        cuda_dir = HERE / "csrc" / "cuda"
        sources += sorted(str(p.relative_to(HERE)) for p in [*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")])
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    ext = extension("sparse_grad._C", sources, include_dirs=[str(HERE / "csrc")],
                    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                    extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension}


EXT_MODULES, CMDCLASS = _native_build()

setup(
    name="sparse_grad",
    version=VERSION,
    description="Fast sparse fine-tuning for PyTorch: fused block gradient norms, on-device "
                "top-block selection and a masked AdamW step (SparseAdamW).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_grad", "sparse_grad.*"]) + ["sparse_grad.triton_kernels"],
    package_dir={"sparse_grad.triton_kernels": "triton_kernels"},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        "torch>=2.6",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",  # blueprint and monitor-dump files
    ],
    extras_require={
        # the test suite draws the plots too (headless: figures are saved without pyplot)
        # the integration tests train through transformers' Trainer and Lightning (CPU, tiny models)
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "transformers>=4.40", "accelerate>=0.26",
                 "lightning>=2.2", "hypothesis>=6"],
        "hf": ["transformers>=4.40", "accelerate>=0.26"],  # Trainer needs accelerate
        "lightning": ["lightning>=2.2"],
        "bench": ["pytest-benchmark>=4"],
        "plots": ["matplotlib>=3.7"],
        "energy": ["nvidia-ml-py"],  # GPU energy readings for sparse_grad.cpr.ResourceMeter
    },
)
