"""What a SparseAdamW checkpoint promises beyond a plain round trip:

- the group state (selection, compact slabs) lives in the saved param groups, so torch's own
  checkpoint API (``torch.distributed.checkpoint.state_dict``) and copies of the optimizer
  (deepcopy, pickle) keep it, and the copy continues bit for bit;
- a state dict held across a step shows that step everywhere (live, like torch's);
- a tampered or cut-short state dict is refused with a ValueError naming what is wrong, and the
  optimizer and params stay as they were; one that loads also steps.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _utils import assert_same, heavy_tailed, snapshot
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from sparse_grad import SparseAdamW
from sparse_grad.distributed import load_optimizer_state_dict, optimizer_state_dict

SHAPES = [(37,), (5, 13), (3,), (4, 4, 5)]  # a tail, a tensor smaller than a block
OPTIONS = [
    {"density": 0.3, "block_size": 8, "reselect_every": 3},
    {"density": 0.3, "block_size": 8, "reselect_every": 3, "state_layout": "compact", "score_ema": 0.5},
    {"density": 0.4, "block_size": 4, "reselect_every": 2, "selection": "random", "seed": 3,
     "state_layout": "compact", "error_feedback": True},
]


def model_and_optimizer(options, seed):
    torch.manual_seed(seed)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in SHAPES])
    return model, SparseAdamW(model.parameters(), lr=1e-2, backend="reference", **options)


def steps(model, opt, grads):
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        opt.step()


def draw_grads(n):
    return [[heavy_tailed(s) for s in SHAPES] for _ in range(n)]


def observable(model, opt):
    return snapshot(([p.detach() for p in model.parameters()], opt.state_dict()))


@pytest.mark.parametrize("options", OPTIONS)
def test_copies_and_torch_checkpoint_api_continue_bit_for_bit(options):
    seed = int(torch.randint(0, 2**31, ()))
    before, after = draw_grads(4), draw_grads(4)  # 4 steps: mid-interval for reselect_every 3
    model, opt = model_and_optimizer(options, seed)
    steps(model, opt, before)
    copies = {"deepcopy": copy.deepcopy((model, opt)),
              "pickle": pickle.loads(pickle.dumps((model, opt))),
              "torch.save": torch.load(_saved((model, opt)), weights_only=False)}  # our own object
    # torch's checkpoint API (what accelerate, Lightning and torchtitan call) into a fresh run
    fresh_model, fresh = model_and_optimizer(options, seed + 1)
    fresh_model.load_state_dict(model.state_dict())
    saved = torch.load(_saved(get_optimizer_state_dict(model, opt)), weights_only=True)
    set_optimizer_state_dict(fresh_model, fresh, saved)
    copies["dcp.state_dict"] = (fresh_model, fresh)
    steps(model, opt, after)
    expected = observable(model, opt)
    for how, (copy_model, copy_opt) in copies.items():
        steps(copy_model, copy_opt, after)
        assert_same(observable(copy_model, copy_opt)[0], expected[0]), how
        assert_same(copy_opt.state_dict()["param_groups"][0]["sparse_grad"],
                    expected[1]["param_groups"][0]["sparse_grad"]), how


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("options", OPTIONS)
def test_a_state_dict_held_across_a_step_shows_that_step(options):
    seed = int(torch.randint(0, 2**31, ()))
    grads = draw_grads(6)
    model, opt = model_and_optimizer(options, seed)
    steps(model, opt, grads[:2])
    held = opt.state_dict()
    steps(model, opt, grads[2:4])  # crosses a reselection
    assert_same(snapshot(held), opt.state_dict())
    resumed_model, resumed = model_and_optimizer(options, seed)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(torch.load(_saved(held), weights_only=True))
    steps(model, opt, grads[4:])
    steps(resumed_model, resumed, grads[4:])
    assert_same(observable(resumed_model, resumed), observable(model, opt))


def _group(sd, i=0):
    return sd["param_groups"][i]["sparse_grad"]


def _selection_ids(value):
    def tamper(sd):
        _group(sd)["selection"]["block_ids"] = value(_group(sd)["selection"]["block_ids"])
    return tamper


def _set(path, value):
    def tamper(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return tamper


def _drop(path):
    def tamper(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return tamper


def _other_blocks(compact: dict) -> dict:
    """A consistent slot table for another set of blocks: one selected block swapped for one that
    is not."""
    table = compact["slot_of_block"]
    chosen = set(compact["block_of_slot"].tolist())
    swapped = sorted((chosen - {min(chosen)}) | {min(set(range(table.numel())) - chosen)})
    ids = torch.tensor(swapped, dtype=torch.int64)
    table = torch.full_like(table, -1)
    table[ids] = torch.arange(ids.numel(), dtype=table.dtype)
    return {**compact, "block_of_slot": ids, "slot_of_block": table}


SEL = ("param_groups", 0, "sparse_grad", "selection")
COMPACT = ("param_groups", 0, "sparse_grad", "compact")
TAMPERED = [  # (options index, tamper, message)
    (0, _selection_ids(lambda ids: ids + 1000), r"\['block_ids'\] must be strictly ascending ids in \[0, "),
    (0, _selection_ids(lambda ids: ids - ids[0] - 1), r"strictly ascending ids"),
    (0, _selection_ids(lambda ids: torch.cat([ids[:1], ids])), r"strictly ascending ids"),
    (0, _selection_ids(lambda ids: ids.flip(0)), r"strictly ascending ids"),
    (0, _selection_ids(lambda ids: ids.float()), r"\['block_ids'\] must be a 1-D int64 tensor"),
    (0, _selection_ids(lambda ids: ids[None]), r"must be a 1-D int64 tensor"),
    (0, _selection_ids(lambda ids: torch.arange(1000)), r"holds 1000 ids, but the params it was made for have"),
    (0, _set(SEL + ("age",), -1), r"\['age'\] must be a non-negative int, got -1"),
    (0, _set(SEL + ("age",), 1.5), r"\['age'\] must be a non-negative int"),
    (2, _set(SEL + ("draw",), -3), r"\['draw'\] must be a non-negative int"),
    (0, _set(SEL + ("key",), (0, 1)), r"\['key'\] must be a tuple"),
    (0, _set(SEL + ("key",), lambda key: ((3, 1), *key[1:])), r"\['key'\]\[0\] must be ascending positions"),
    (0, _set(SEL + ("key",), lambda key: ((0, 9), *key[1:])), r"\['key'\]\[0\] must be ascending positions"),
    (0, _set(SEL + ("key",), lambda key: (key[0], -8, *key[2:])), r"\['key'\]\[1\] must be a positive int"),
    (0, _set(SEL, "ids"), r"\['selection'\] must be a dict"),
    (0, _set(("state", 1, "block_step"), lambda s: s - s - 1), r"its block_step holds step counts outside"),
    (0, _set(("state", 1, "block_step"), lambda s: torch.full_like(s, 2**31 - 1)), r"step counts outside"),
    (0, _set(("state", 0, "exp_avg_sq"), lambda v: -v - 1), r"its exp_avg_sq holds negative values"),
    (1, _set(COMPACT + ("block_step",), lambda s: s - 100), r"\['compact'\]\['block_step'\] holds step counts"),
    (1, _set(COMPACT + ("exp_avg_sq",), lambda v: v - v.max() - 1), r"\['exp_avg_sq'\] holds negative values"),
    (1, _set(COMPACT + ("slot_of_block",), lambda s: s.roll(1)), r"\['slot_of_block'\] does not match"),
    (1, _set(COMPACT + ("block_of_slot",), lambda b: b.flip(0)), r"\['block_of_slot'\] must be strictly ascending"),
    (1, _set(COMPACT, lambda c: _other_blocks(c)), r"holds the moments of other blocks"),
    (0, _drop(SEL), r"has no selection, but the group has stepped"),
    (1, _drop(SEL), r"has no selection, but the group has stepped"),
    (1, _drop(COMPACT), r"has no compact state, but the group's state_layout is 'compact'"),
    (0, _set(("param_groups", 0, "sparse_grad"), {"selection": None, "other": 1}), r"must be a dict with 'selection'"),
    (0, _drop(("param_groups", 0, "density")), r"\['param_groups'\]\[0\] has no 'density' option"),
    (0, _drop(("param_groups", 0, "block_size")), r"has no 'block_size' option"),
    (0, _set(("param_groups", 0, "block_size"), 2**40), r"\['block_size'\] must be at most"),
    (0, _drop(("param_groups",)), r"state_dict must be a dict with 'state' and 'param_groups'"),
]


@pytest.mark.parametrize("case", range(len(TAMPERED)))
def test_a_tampered_state_dict_is_refused_and_changes_nothing(case):
    index, tamper, message = TAMPERED[case]
    options = OPTIONS[index]
    model, opt = model_and_optimizer(options, int(torch.randint(0, 2**31, ())))
    steps(model, opt, draw_grads(4))
    held = opt.state_dict()
    before = observable(model, opt)
    bad = snapshot(opt.state_dict())
    tamper(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_same(observable(model, opt), before)
    assert_same(held, before[1])  # the live record was not replaced either
    steps(model, opt, draw_grads(1))  # and it still steps


def test_a_group_saved_before_later_options_loads_and_steps():
    model, opt = model_and_optimizer(OPTIONS[0], int(torch.randint(0, 2**31, ())))
    steps(model, opt, draw_grads(2))
    old = snapshot(opt.state_dict())
    for key in ("maximize", "selection", "seed"):  # torch's own test drops maximize the same way
        del old["param_groups"][0][key]
    old["selections"] = {0: old["param_groups"][0].pop("sparse_grad")["selection"]}  # the older layout
    twin_model, twin = model_and_optimizer(OPTIONS[0], 0)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(old)
    assert twin.param_groups[0]["maximize"] is False and twin.param_groups[0]["selection"] == "norm"
    assert "sparse_grad" not in twin.param_groups[0]  # group state is not a group option
    grads = draw_grads(3)
    steps(model, opt, grads)
    steps(twin_model, twin, grads)
    assert_same(observable(twin_model, twin), observable(model, opt))


def test_a_failed_distributed_load_changes_nothing():
    options = OPTIONS[1]
    model, opt = model_and_optimizer(options, int(torch.randint(0, 2**31, ())))
    steps(model, opt, draw_grads(4))
    saved = optimizer_state_dict(opt)
    meta = torch.load(io.BytesIO(saved["sparse_grad"]), weights_only=True)
    other_model, other = model_and_optimizer(options, 1)
    steps(other_model, other, draw_grads(2))
    before = observable(other_model, other)
    for ids in ([5, 3], [0, 10**6], [-1, 2], "0,1"):
        meta["selections"][0]["block_ids"] = ids
        with pytest.raises(ValueError, match=r"selection\['block_ids'\]"):
            load_optimizer_state_dict(other, {"state": saved["state"], "sparse_grad": meta})
        assert_same(observable(other_model, other), before)
