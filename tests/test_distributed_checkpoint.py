"""Distributed checkpoints (torch.distributed.checkpoint + sparse_grad.distributed): saved under
FSDP2 at world size 2, resumed at 3, the run continues as if never interrupted; dense and compact
state. Without a process group, the same functions round-trip bit for bit."""
from __future__ import annotations

import _distributed
import pytest
import torch
from _distributed import single_process, spawn
from _utils import assert_same, heavy_tailed

from sparse_grad import SparseAdamW
from sparse_grad.distributed import load_optimizer_state_dict, optimizer_state_dict

BASE = {"lr": 1e-2, "density": 0.3, "block_size": 16}
CONFIGS = [
    {},
    {"state_layout": "compact", "reselect_every": 3, "error_feedback": True, "score_ema": 0.7},
    {"reselect_every": 4, "selection": "random", "seed": 5, "state_layout": "compact", "max_grad_norm": 0.1},
]
BEFORE, AFTER = 4, 3


def test_resume_at_another_world_size(tmp_path):
    configs = [{**BASE, **c} for c in CONFIGS]
    saved = spawn(_distributed.save_then_continue, 2, tmp_path / "save", configs, BEFORE, AFTER, str(tmp_path))
    resumed = spawn(_distributed.resume, 3, tmp_path / "resume", configs, BEFORE, AFTER, str(tmp_path))
    for i, options in enumerate(configs):
        expected = single_process(options, BEFORE + AFTER)
        for name, value in expected.items():
            for run in (saved[0][i], resumed[0][i], resumed[2][i]):
                torch.testing.assert_close(run[name], value, atol=1e-6, rtol=1e-5,
                                           msg=lambda m, o=options, n=name: f"options {o}, {n}: {m}")


def _steps(model, opt, n):
    for _ in range(n):
        for p in model.parameters():
            p.grad = heavy_tailed(p.shape)
        opt.step()


@pytest.mark.parametrize("options", [{}, {"state_layout": "compact", "reselect_every": 2, "score_ema": 0.5},
                                     {"error_feedback": True, "state_layout": "compact"}])
def test_round_trip_without_process_group(options):
    torch.manual_seed(0)
    model = _distributed.model()
    opt = SparseAdamW(model.parameters(), **BASE, **options)
    _steps(model, opt, 3)
    state = optimizer_state_dict(opt)
    copy = _distributed.model()
    copy.load_state_dict(model.state_dict())
    resumed = SparseAdamW(copy.parameters(), **BASE, **options)
    load_optimizer_state_dict(resumed, optimizer_state_dict(resumed) | state)
    seed = torch.seed()
    _steps(model, opt, 3)
    torch.manual_seed(seed)
    _steps(copy, resumed, 3)
    assert_same(list(copy.parameters()), list(model.parameters()))
    assert_same(resumed.state_dict(), opt.state_dict())


def test_load_checks_before_changing_anything():
    model = _distributed.model()
    opt = SparseAdamW(model.parameters(), **BASE)
    _steps(model, opt, 1)
    state = optimizer_state_dict(opt)
    other = SparseAdamW(model.parameters(), **{**BASE, "block_size": 8})
    with pytest.raises(ValueError, match="block_size=16"):
        load_optimizer_state_dict(other, state)
    assert not other.state
    shrunk = SparseAdamW(list(model.parameters())[:2], **BASE)
    with pytest.raises(ValueError, match="params"):
        load_optimizer_state_dict(shrunk, state)
    bad = {"state": dict(state["state"]), "sparse_grad": state["sparse_grad"]}
    bad["state"][1] = {**bad["state"][1], "exp_avg": torch.zeros(3)}
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"\['exp_avg'\] does not fit"):
        load_optimizer_state_dict(opt, bad)
    assert_same(opt.state_dict(), before)
    with pytest.raises(TypeError, match="SparseAdamW"):
        optimizer_state_dict(torch.optim.AdamW(model.parameters()))


def test_per_rank_state_dict_and_local_compact_state(tmp_path):
    """Dense: each rank's SparseAdamW.state_dict() reloads at the same world size and continues bit
    for bit. Compact: each rank keeps slots only for its parts of the selected blocks, and its
    per-rank state_dict refuses to load, pointing to sparse_grad.distributed."""
    dense = spawn(_distributed.per_rank_state_dict, 3, tmp_path / "dense", BASE, BEFORE, AFTER)
    for (uninterrupted, resumed), _, _ in dense:
        assert_same(resumed, uninterrupted)
    compact = spawn(_distributed.per_rank_state_dict, 3, tmp_path / "compact",
                    {**BASE, "state_layout": "compact"}, BEFORE, AFTER)
    selected = compact[0][2]
    capacities = [capacity for _, capacity, _ in compact]
    assert all(0 < c < selected for c in capacities) and sum(capacities) >= selected, (capacities, selected)
    for message, _, _ in compact:
        assert "sparse_grad.distributed" in message


class _Payload:
    """An object a tampered checkpoint could smuggle in: unpickling it would run its __reduce__."""

    def __reduce__(self):
        return (exec, ("import sys; sys.modules['sparse_grad'].TAMPERED = True",))


def test_tampered_metadata_is_refused_without_unpickling():
    import io
    import sparse_grad
    model = _distributed.model()
    opt = SparseAdamW(model.parameters(), **BASE)
    _steps(model, opt, 1)
    state = optimizer_state_dict(opt)
    buffer = io.BytesIO()
    torch.save({"format": 1, "payload": _Payload()}, buffer)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['sparse_grad'\] cannot be read"):
        load_optimizer_state_dict(opt, {"state": state["state"], "sparse_grad": buffer.getvalue()})
    assert not hasattr(sparse_grad, "TAMPERED")
    assert_same(opt.state_dict(), before)
