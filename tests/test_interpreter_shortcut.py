"""The suite's interpreter shortcut (tests/_interpreter.py) is on under TRITON_INTERPRET=1 and
changes no result: the norm pass, the selection and the update give the same bits without it."""
from __future__ import annotations

import os

import pytest
import torch

from _interpreter import skip_repatching_inside_launches, without_shortcut
from _utils import heavy_tailed

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's shortcut")


def test_the_shortcut_is_on():
    # False would mean triton's interpreter changed: the suite would still pass, three times slower.
    assert skip_repatching_inside_launches()


def _steps(params, grads):
    from sparse_grad import SparseAdamW
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = SparseAdamW(params, lr=1e-2, block_size=32, density=0.3, backend="triton")
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return [p.detach() for p in params], opt.selected_blocks()[0][2]


def test_same_bits_as_the_interpreter_as_it_ships():
    shapes = [(7, 13), (100,), (3,), (65,)]
    params = [heavy_tailed(s) for s in shapes]
    grads = [[heavy_tailed(s) for s in shapes] for _ in range(3)]
    with_it, ids = _steps(params, grads)
    with without_shortcut():
        without, ids_without = _steps(params, grads)
    assert torch.equal(ids, ids_without)
    for a, b in zip(with_it, without):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, p) for a, p in zip(with_it, params))  # the steps moved them
