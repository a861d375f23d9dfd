"""Selection alone (scores -> ascending ids) per backend, density and scope, on the block
scores of the shape set's grads at block size 1024 (394K blocks for llm-400m at full size).
Ideal bytes: one read of the scores and one write of the ids."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import ops
from _cases import TIMED_BACKENDS, params_of, skip_unless_timed
from _report import record

BLOCK_SIZE = 1024


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.05, 0.01])
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_select_blocks(benchmark, timed, device, quick, shape_set, shape_list, backend, density, scope):
    skip_unless_timed(backend, device)
    grads = [p.grad for p in params_of(shape_list, device)]
    scores = ops.block_sqnorms(grads, BLOCK_SIZE)
    segments = ops.BlockLayout(grads, BLOCK_SIZE) if scope == "tensor" else None
    out = {}
    timed(lambda: out.__setitem__("ids", ops.select_blocks(scores, density=density, segments=segments,
                                                            backend=backend)))
    if quick:
        expected = ops.select_blocks(scores.cpu(), density=density, segments=segments, backend="reference")
        assert torch.equal(out["ids"].cpu(), expected)
    record(benchmark, f"select_blocks {backend} d={density:g} {scope}", shape_set, scores.numel(),
           4 * scores.numel() + 8 * out["ids"].numel(), baseline="read")
