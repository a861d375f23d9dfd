"""Installs sparse_grad; the top-level folder triton_kernels/ becomes sparse_grad.triton_kernels."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "sparse_grad" / "__init__.py").read_text()).group(1)

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
    install_requires=[
        "torch>=2.6",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",  # blueprint and monitor-dump files
    ],
    extras_require={
        # the test suite draws the plots too (headless: figures are saved without pyplot)
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        "bench": ["pytest-benchmark>=4"],
        "plots": ["matplotlib>=3.7"],
        "energy": ["nvidia-ml-py"],  # GPU energy readings for sparse_grad.cpr.ResourceMeter
    },
)
