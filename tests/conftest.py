import os
import random
import zlib

import pytest
import torch

from _utils import backend_cases
from _interpreter import skip_repatching_inside_launches

if os.environ.get("TRITON_INTERPRET") == "1":
    skip_repatching_inside_launches()

# Fresh random data on every run; rerun one with SPARSE_GRAD_TEST_SEED=<seed shown in the header>.
# Put in the environment so that pytest-xdist's workers, started after this import, draw the
# same seed as the process that prints the header.
SESSION_SEED = int(os.environ.setdefault("SPARSE_GRAD_TEST_SEED", str(random.randrange(2**31))))


def pytest_report_header(config):
    return (f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
            f"SPARSE_GRAD_TEST_SEED={SESSION_SEED}, "
            f"backend cases: {['-'.join(c) for c in backend_cases()]}")


@pytest.fixture(params=backend_cases(), ids=lambda c: "-".join(c))
def case(request):
    """(device, backend) for every backend that can run here."""
    return request.param


@pytest.fixture(params=[c for c in backend_cases() if c[1] == "triton"], ids=lambda c: "-".join(c))
def triton_case(request):
    """(device, "triton") where the Triton backend runs here (compiled on CUDA, else interpreted)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
