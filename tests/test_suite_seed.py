"""The suite's random seed: one per run, the same in every pytest-xdist worker as in the header."""
import os

from conftest import SESSION_SEED


def test_every_worker_uses_the_seed_the_header_shows():
    # The controller exports its seed before it starts the workers, which read it back.
    assert os.environ["SPARSE_GRAD_TEST_SEED"] == str(SESSION_SEED)
