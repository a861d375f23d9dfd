"""SparseAdamW under DDP on gloo/CPU: grads are all-reduced before the step, so every rank selects
the same blocks and applies the same update; the result is one process's on the global batch."""
from __future__ import annotations

import _distributed
import pytest
import torch
from _distributed import single_process, spawn
from _utils import assert_same

CONFIGS = [
    {"lr": 1e-2, "density": 0.2, "block_size": 16},
    {"lr": 1e-2, "density": 0.3, "block_size": 7, "state_layout": "compact", "max_grad_norm": 0.05,
     "score_ema": 0.9, "reselect_every": 2},
    {"lr": 1e-2, "density": 0.25, "block_size": 32, "scope": "tensor", "error_feedback": True,
     "backend": "reference"},
]
STEPS = 6


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_identical_and_equal_one_process(world, tmp_path):
    results = spawn(_distributed.ddp_runs, world, tmp_path, CONFIGS, STEPS)
    for i, options in enumerate(CONFIGS):
        for rank in range(1, world):
            assert_same(results[rank][i], results[0][i])  # bit for bit on every rank
        expected = single_process(options, STEPS)
        for name, value in expected.items():
            torch.testing.assert_close(results[0][i][name], value, atol=1e-6, rtol=1e-5,
                                       msg=lambda m, o=options, n=name: f"options {o}, {n}: {m}")
