"""sparse_grad.sparsify: any elementwise torch.optim optimizer on the selected blocks.

At density 1 the wrapper must give the unwrapped optimizer's numbers bit for bit (the same
functional runs on the same elements). Below density 1 it is compared with an oracle that runs
one unwrapped optimizer per block (each block's own params, state, step count and lazy buffers),
stepping a block's optimizer only when the wrapper selected that block; the selection itself is
checked against ``ops.select_blocks`` over ``ops.block_sqnorms``.
"""
from __future__ import annotations

import io

import pytest
import torch

import sparse_grad
from sparse_grad import ops
from _utils import assert_same, assert_step_frees_grads, heavy_tailed, snapshot

SHAPES = [(37,), (5, 7), (3,), (1,)]  # a partial last block, a 2-D param, params below one block
BLOCK = 8

# Every supported class with option sets that reach its branches.
CASES = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    (torch.optim.AdamW, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.RMSprop, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    (torch.optim.Adamax, {"lr": 0.01, "weight_decay": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    (torch.optim.RAdam, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CASES)]


def _params(dtype=torch.float32, shapes=SHAPES):
    return [heavy_tailed(shape, dtype) for shape in shapes]


def _grads(params, steps):
    return [[heavy_tailed(p.shape, p.dtype) for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_density_one_is_the_wrapped_optimizer(cls, kw, foreach):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        params = _params(dtype)
        grads = _grads(params, 4)
        ours, theirs = snapshot(params), snapshot(params)
        _run(sparse_grad.sparsify(cls(ours, foreach=foreach, **kw), density=1.0, block_size=BLOCK), ours, grads)
        _run(cls(theirs, foreach=foreach, **kw), theirs, grads)
        assert_same(ours, theirs)


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {"lr": 0.01}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                    (torch.optim.Adagrad, {"lr": 0.1})], ids=["Adam", "SGD", "Adagrad"])
def test_density_one_fused(cls, kw):
    params = _params()
    grads = _grads(params, 3)
    ours, theirs = snapshot(params), snapshot(params)
    _run(sparse_grad.sparsify(cls(ours, fused=True, **kw), density=1.0, block_size=BLOCK), ours, grads)
    _run(cls(theirs, fused=True, **kw), theirs, grads)
    assert_same(ours, theirs)


class BlockOracle:
    """One unwrapped optimizer per block of every param: a block's optimizer steps only when the
    wrapper selected the block, so its state and step count are the block's own."""

    def __init__(self, cls, kw, params, block_size, foreach=False):
        self.block_size = block_size
        self.make = lambda piece: cls([piece], foreach=foreach, **kw)
        self.blocks = []  # per param: [(slice, tensor, optimizer)]
        for p in params:
            flat = p.detach().reshape(-1)
            parts = []
            for start in range(0, flat.numel(), block_size):
                piece = flat[start:start + block_size].clone()
                parts.append((slice(start, start + piece.numel()), piece, cls([piece], foreach=foreach, **kw)))
            self.blocks.append(parts)
        self.counts = [[0] * len(parts) for parts in self.blocks]

    def step(self, grads, selected):
        """``selected``: per param, the local ids of the blocks to update."""
        for t, ids in enumerate(selected):
            flat = grads[t].reshape(-1)
            for b in ids:
                where, piece, opt = self.blocks[t][b]
                piece.grad = flat[where].clone()
                opt.step()
                self.counts[t][b] += 1

    def restart(self, t, b):
        """Block ``b`` of param ``t`` enters a compact selection: a fresh optimizer, step 0."""
        where, piece, opt = self.blocks[t][b]
        self.blocks[t][b] = (where, piece, self.make(piece))
        self.counts[t][b] = 0

    def params(self, shapes):
        return [torch.cat([piece for _, piece, _ in parts]).reshape(shape) for parts, shape in zip(self.blocks, shapes)]

    def state(self, t, key):
        parts = []
        for (where, piece, opt) in self.blocks[t]:
            value = opt.state[piece].get(key)
            parts.append(torch.zeros_like(piece) if value is None else value)  # never stepped: zeros
        return torch.cat(parts)


def _local(ids, params, block_size):
    layout = sparse_grad.BlockLayout(params, block_size)
    offsets = layout.block_offsets.tolist()
    return [[b - offsets[t] for b in ids if offsets[t] <= b < offsets[t + 1]] for t in range(len(params))]


def _expected_ids(grads, density, scope, block_size):
    scores = ops.block_sqnorms(grads, block_size, backend="reference")
    if scope == "tensor":
        layout = sparse_grad.BlockLayout(grads, block_size)
        ks = [ops.num_selected(density, n) for n in layout.block_counts]
        return ops.select_blocks(scores, ks, segments=layout, backend="reference").tolist()
    return ops.select_blocks(scores, density=density, backend="reference").tolist()


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
@pytest.mark.parametrize("density,scope,reselect_every,foreach", [(0.3, "global", 1, False), (0.5, "tensor", 2, False),
                                                                  (0.2, "global", 1, True)])
def test_below_density_one_matches_per_block_oracle(cls, kw, density, scope, reselect_every, foreach):
    dtype = torch.float64 if cls is torch.optim.NAdam else torch.float32
    params = _params(dtype)
    shapes = [p.shape for p in params]
    grads = _grads(params, 6)
    oracle = BlockOracle(cls, kw, params, BLOCK, foreach)  # torch's foreach path rounds differently
    ours = snapshot(params)
    opt = sparse_grad.sparsify(cls(ours, foreach=foreach, **kw), density=density, block_size=BLOCK, scope=scope,
                               reselect_every=reselect_every, backend="reference")
    for i, step in enumerate(grads):
        for p, g in zip(ours, step):
            p.grad = g.clone()
        opt.step()
        [(_, _, ids, _)] = opt.selected_blocks()
        if i % reselect_every == 0:  # a reselection: the top blocks of this step's grads
            assert ids.tolist() == _expected_ids(step, density, scope, BLOCK)
        oracle.step(step, _local(ids.tolist(), ours, BLOCK))
    assert_same(ours, oracle.params(shapes))
    for t, p in enumerate(ours):
        state = opt.state[p]
        assert state["block_step"].tolist() == oracle.counts[t]
        for key in state:
            if key in ("block_step", "block_mu_product"):
                continue
            assert_same(state[key].reshape(-1), oracle.state(t, key))


def test_unselected_blocks_and_params_without_grad_keep_everything():
    params = _params()
    opt = sparse_grad.sparsify(torch.optim.Adam(params, lr=0.1), density=0.25, block_size=BLOCK)
    _run(opt, params, _grads(params, 2))
    before = snapshot((params, {i: opt.state[p] for i, p in enumerate(params)}))
    for p in params[:-1]:
        p.grad = heavy_tailed(p.shape)
    params[-1].grad = None
    opt.step()
    [(_, taking_part, ids, _)] = opt.selected_blocks()
    assert len(taking_part) == len(params) - 1
    selected = _local(ids.tolist(), taking_part, BLOCK)
    for t, p in enumerate(params):
        chosen = selected[t] if t < len(selected) else []
        for key, value in [("param", p), *opt.state[p].items()]:
            old = before[0][t] if key == "param" else before[1][t][key]
            per_block = key in ("block_step", "block_mu_product")
            for b in range(-(-p.numel() // BLOCK)):
                where = slice(b, b + 1) if per_block else slice(b * BLOCK, (b + 1) * BLOCK)
                if b not in chosen:
                    assert_same(value.reshape(-1)[where], old.reshape(-1)[where])
                elif key == "block_step":
                    assert int(value[b]) == int(old[b]) + 1


def _assert_resume_is_bit_exact(cls, kw, params, grads, options, split, check):
    """A run saved after ``split`` steps (torch.save / torch.load(weights_only=True)), loaded into
    a new wrapped optimizer and continued ends bit-equal to the run straight through;
    ``check(opt, again, resumed_params)`` looks at the loaded state first."""
    straight = snapshot(params)
    _run(sparse_grad.sparsify(cls(straight, **kw), **options), straight, grads)
    first = snapshot(params)
    opt = sparse_grad.sparsify(cls(first, **kw), **options)
    _run(opt, first, grads[:split])
    buffer = io.BytesIO()
    torch.save({"params": first, "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = saved["params"]
    again = sparse_grad.sparsify(cls(resumed, **kw), **options)
    again.load_state_dict(saved["opt"])
    check(opt, again, resumed)
    _run(again, resumed, grads[split:])
    assert_same(resumed, straight)


@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[4], CASES[8], CASES[11]], ids=[IDS[2], IDS[4], IDS[8], IDS[11]])
def test_resume_mid_interval_is_bit_exact(cls, kw):
    params = _params()
    grads = _grads(params, 6)
    options = {"density": 0.4, "block_size": BLOCK, "reselect_every": 3, "selection": "random", "seed": 5}

    def int32_counts(opt, again, resumed):
        assert again.state[resumed[0]]["block_step"].dtype == torch.int32

    _assert_resume_is_bit_exact(cls, kw, params, grads, options, 2, int32_counts)


def test_param_groups_and_scheduler_are_the_wrappers():
    params = _params()
    grads = _grads(params, 5)
    ours, theirs = snapshot(params), snapshot(params)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05, "momentum": 0.5}]
    opt = sparse_grad.sparsify(torch.optim.SGD(groups(ours), lr=0.1, momentum=0.9), density=1.0, block_size=BLOCK)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.5]
    assert all(g["density"] == 1.0 and g["block_size"] == BLOCK for g in opt.param_groups)
    reference = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, reference)]
    for step in grads:
        for o, ps, schedule in zip((opt, reference), (ours, theirs), schedules):
            for p, g in zip(ps, step):
                p.grad = g.clone()
            o.step()
            schedule.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in reference.param_groups]
    assert_same(ours, theirs)


def test_param_group_options():
    a, b = _params()[:2]
    opt = sparse_grad.sparsify(torch.optim.Adam([a], lr=0.01), density=0.5, block_size=BLOCK)
    opt.add_param_group({"params": [b], "density": 1.0, "scope": "tensor", "lr": 0.1})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999) and opt.param_groups[1]["density"] == 1.0
    before = b.clone()
    a.grad, b.grad = heavy_tailed(a.shape), heavy_tailed(b.shape)
    opt.step()
    assert bool((b != before).all())  # density 1: every element moved
    assert opt.state[b]["block_step"].tolist() == [1] * 5
    assert sum(opt.state[a]["block_step"].tolist()) == 3  # ceil(0.5 · 5)


def test_grad_scaler_matches_unwrapped():
    params = _params()
    grads = _grads(params, 4)
    grads[2][1][3] = float("inf")  # an overflowed step: skipped by both
    ours, theirs = snapshot(params), snapshot(params)
    runs, wrapper = [], None
    for ps in (ours, theirs):
        inner = torch.optim.Adam(ps, lr=0.01)
        opt = sparse_grad.sparsify(inner, density=1.0, block_size=BLOCK) if ps is ours else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in grads:
            scale = scaler.scale(torch.ones(()))  # as scaler.scale(loss) before backward
            for p, g in zip(ps, step):
                p.grad = g * scale
            scaler.step(opt)
            scaler.update()
        runs.append(scaler.get_scale())
        wrapper = wrapper if ps is theirs else opt
    assert runs[0] == runs[1] < 2.0**10
    assert_same(ours, theirs)
    assert wrapper.state[ours[1]]["block_step"].tolist() == [3] * 5  # the skipped step did not count


def test_compiled_step_runs_eagerly_or_says_why():
    params = _params()
    grads = _grads(params, 4)
    ours, theirs = snapshot(params), snapshot(params)
    compiled = sparse_grad.sparsify(torch.optim.Adam(ours, lr=0.1), density=0.4, block_size=BLOCK)
    step = torch.compile(compiled.step)
    for grad in grads:
        for p, g in zip(ours, grad):
            p.grad = g.clone()
        step()
    _run(sparse_grad.sparsify(torch.optim.Adam(theirs, lr=0.1), density=0.4, block_size=BLOCK), theirs, grads)
    assert_same(ours, theirs)
    before = snapshot((ours, compiled.state_dict()["state"]))
    torch._dynamo.reset()  # else dynamo may reuse the entry it cached for the call above
    with pytest.raises(Exception, match="runs eagerly: compile the model"):  # dynamo's Unsupported, our reason
        torch.compile(compiled.step, fullgraph=True)()
    assert_same((ours, compiled.state_dict()["state"]), before)


def test_copies_continue_bit_for_bit():
    import copy
    params = _params()
    grads = _grads(params, 4)
    opt = sparse_grad.sparsify(torch.optim.NAdam(params, lr=0.01), density=0.5, block_size=BLOCK, reselect_every=2)
    _run(opt, params, grads[:1])
    twin = copy.deepcopy({"params": params, "opt": opt})
    _run(opt, params, grads[1:])
    _run(twin["opt"], twin["params"], grads[1:])
    assert_same(params, twin["params"])


class MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize("make,name", [
    (lambda ps: torch.optim.LBFGS(ps), "LBFGS"),
    (lambda ps: torch.optim.SparseAdam(ps), "SparseAdam"),
    (lambda ps: torch.optim.ASGD(ps), "ASGD"),
    (lambda ps: MyAdam(ps), "MyAdam"),
])
def test_refuses_optimizers_it_cannot_vouch_for(make, name):
    with pytest.raises(TypeError, match=name):
        sparse_grad.sparsify(make(_params()[:1]))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sparse_grad.sparsify(object())


def test_bad_input():
    params = _params()
    with pytest.raises(ValueError, match="density"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), density=0.0)
    with pytest.raises(ValueError, match="block_size"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), block_size=0)
    with pytest.raises(ValueError, match="state_layout"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), state_layout="sparse")
    with pytest.raises(ValueError, match="scope"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), scope="layer")
    with pytest.raises(TypeError, match="options"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), options=1)
    with pytest.raises(ValueError, match="differentiable"):
        sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1, differentiable=True))
    stepped = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = heavy_tailed(p.shape)
    stepped.step()
    with pytest.raises(ValueError, match="already stepped"):
        sparse_grad.sparsify(stepped)
    opt = sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), block_size=BLOCK)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['density'\]"):
        opt.add_param_group({"params": [heavy_tailed((4,))], "density": 2.0})


def test_bad_step_writes_nothing():
    params = _params()
    opt = sparse_grad.sparsify(torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1),
                               density=0.5, block_size=BLOCK)
    _run(opt, params, _grads(params, 1))
    before = snapshot((params, opt.state_dict()))
    for p in params:
        p.grad = heavy_tailed(p.shape)
    params[3].grad.data = heavy_tailed((2,))  # the second group's grad does not fit its param
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\]\.grad has shape"):
        opt.step()
    assert_same((params, opt.state_dict()), before)
    params[3].grad = heavy_tailed((1,))
    opt.param_groups[0]["block_size"] = 4  # the state was made with blocks of 8
    with pytest.raises(ValueError, match="block_size"):
        opt.step()
    assert_same((params, opt.state_dict()["state"]), (before[0], before[1]["state"]))


def test_bad_state_dict_is_refused_and_changes_nothing():
    params = _params()
    opt = sparse_grad.sparsify(torch.optim.Adam(params, lr=0.1), density=0.5, block_size=BLOCK)
    _run(opt, params, _grads(params, 2))
    good = snapshot(opt.state_dict())
    before = snapshot(opt.state_dict())

    def tampered(edit):
        sd = snapshot(good)
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd["state"][0]["block_step"].fill_(-1), "step counts"),
        (lambda sd: sd["state"][0].update(block_step=sd["state"][0]["block_step"].float()), "int32"),
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), "shape"),
        (lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(5, 7)), "unknown state"),
        (lambda sd: sd["state"][2]["exp_avg_sq"].fill_(-1.0), "negative"),
        (lambda sd: sd["param_groups"][0].pop("density"), "density"),
        (lambda sd: sd["param_groups"][0]["sparse_grad"].pop("selection"), "no selection"),
        (lambda sd: sd["param_groups"][0]["sparse_grad"]["selection"].update(block_ids=torch.tensor([99])),
         "ascending ids"),
        (lambda sd: sd["param_groups"].append(sd["param_groups"][0]), "param groups"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(tampered(edit))
        assert_same(opt.state_dict(), before)


def test_every_backend_selects_as_the_reference(case):
    device, backend = case
    params = [p.to(device) for p in _params()]
    grads = [[g.to(device) for g in step] for step in _grads(params, 3)]
    runs = []
    for name in (backend, "reference"):
        ps = snapshot(params)
        opt = sparse_grad.sparsify(torch.optim.RMSprop(ps, lr=0.01, momentum=0.5), density=0.3, block_size=BLOCK,
                                   scope="tensor", min_blocks_per_tensor=2, backend=name)
        _run(opt, ps, grads)
        runs.append((ps, opt.selected_blocks()[0][2]))
    assert_same(runs[0], runs[1])


def test_named_parameters_and_params_without_grad():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1))
    twin = snapshot(model)
    opt = sparse_grad.sparsify(torch.optim.Adam(model.named_parameters(), lr=0.01), density=1.0, block_size=BLOCK)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    reference = torch.optim.Adam(twin.parameters(), lr=0.01)
    x = heavy_tailed((4, 5))
    for step in range(3):
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            m(x).square().sum().backward()
            if step == 1:
                m[1].bias.grad = None  # takes no part in this step, like torch
            o.step()
    assert_same(list(model.parameters()), list(twin.parameters()))
    assert opt.state[model[1].bias]["block_step"].tolist() == [2]


# --- state_layout="compact": the wrapped optimizer's state for the selected blocks only ---

def _compact(opt, index=0):
    return opt._group_states[index].compact


def _rows(opt, params, block_size):
    """(param index, block of that param, slab row) of every selected block, in slot order."""
    [(_, taking_part, ids, _)] = opt.selected_blocks()
    positions = [next(j for j, p in enumerate(params) if p is q) for q in taking_part]
    local = _local(ids.tolist(), taking_part, block_size)
    rows = [(positions[t], b) for t, blocks in enumerate(local) for b in blocks]
    return [(j, b, row) for row, (j, b) in enumerate(rows)]


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_compact_density_one_is_the_wrapped_optimizer(cls, kw):
    for dtype in (torch.float32, torch.bfloat16):
        params = _params(dtype)
        grads = _grads(params, 4)
        ours, theirs = snapshot(params), snapshot(params)
        opt = sparse_grad.sparsify(cls(ours, **kw), density=1.0, block_size=BLOCK, state_layout="compact")
        _run(opt, ours, grads)
        _run(cls(theirs, **kw), theirs, grads)
        assert_same(ours, theirs)
        assert not any(opt.state[p] for p in ours)  # no per-param state: it is all in the slabs


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_compact_equals_dense_while_the_selection_holds(cls, kw):
    """One selection kept for the whole run (reselect_every beyond it): every selected block has
    the same history in both layouts, so params and state agree bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        params = _params(dtype, shapes=[(37,), (5, 7), (3,), (1,), (19, 3)])
        grads = _grads(params, 5)
        runs = []
        for layout in ("dense", "compact"):
            ps = snapshot(params)
            opt = sparse_grad.sparsify(cls(ps, **kw), density=0.4, block_size=BLOCK, reselect_every=100,
                                       state_layout=layout)
            _run(opt, ps, grads)
            runs.append((ps, opt))
        (dense_params, dense), (compact_params, compact) = runs
        assert_same(compact_params, dense_params)
        slabs = _compact(compact)
        for j, b, row in _rows(compact, compact_params, BLOCK):
            state = dense.state[dense_params[j]]
            assert int(slabs["block_step"][row]) == int(state["block_step"][b]) == 5
            n = min(BLOCK, dense_params[j].numel() - b * BLOCK)
            for key in slabs:
                if key in state and key != "block_step":
                    held = slabs[key][row] if slabs[key].dim() == 1 else slabs[key][row, :n]
                    expected = state[key][b] if slabs[key].dim() == 1 else state[key].reshape(-1)[b * BLOCK:][:n]
                    assert_same(held, expected)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
@pytest.mark.parametrize("density,selection,reselect_every", [(0.3, "norm", 1), (0.4, "random", 2)])
def test_compact_matches_per_block_oracle_with_fresh_entering_blocks(cls, kw, density, selection, reselect_every):
    """A block leaving the selection drops its state; entering, it starts as a new optimizer
    would (zeros, Adagrad's initial accumulator, SGD's lazy momentum, step 0)."""
    dtype = torch.float64 if cls is torch.optim.NAdam else torch.float32
    params = _params(dtype)
    shapes = [p.shape for p in params]
    grads = _grads(params, 7)
    oracle = BlockOracle(cls, kw, params, BLOCK)
    ours = snapshot(params)
    opt = sparse_grad.sparsify(cls(ours, **kw), density=density, block_size=BLOCK, reselect_every=reselect_every,
                               selection=selection, seed=3, backend="reference", state_layout="compact")
    before: set = set()
    entered = 0
    for step in grads:
        for p, g in zip(ours, step):
            p.grad = g.clone()
        opt.step()
        now = {(j, b) for j, b, _ in _rows(opt, ours, BLOCK)}
        for j, b in now - before:
            oracle.restart(j, b)
        entered += len(now - before)
        before = now
        [(_, _, ids, _)] = opt.selected_blocks()
        oracle.step(step, _local(ids.tolist(), ours, BLOCK))
    assert entered > len(before)  # blocks left and came back (the policy was exercised)
    assert_same(ours, oracle.params(shapes))
    slabs = _compact(opt)
    for j, b, row in _rows(opt, ours, BLOCK):
        assert int(slabs["block_step"][row]) == oracle.counts[j][b]
        where, piece, inner = oracle.blocks[j][b]
        for key in slabs:
            if slabs[key].dim() == 2:
                assert_same(slabs[key][row, :piece.numel()], inner.state[piece][key])


@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[4], CASES[8], CASES[9], CASES[11]],
                         ids=[IDS[2], IDS[4], IDS[8], IDS[9], IDS[11]])
def test_compact_resume_mid_interval_is_bit_exact(cls, kw):
    params = _params(shapes=[(37,), (5, 7), (3,), (1,), (19, 3)])
    grads = _grads(params, 7)
    options = {"density": 0.4, "block_size": BLOCK, "reselect_every": 3, "state_layout": "compact"}

    def same_selection(opt, again, resumed):
        assert_same(again.state_dict()["param_groups"][0]["sparse_grad"],
                    opt.state_dict()["param_groups"][0]["sparse_grad"])

    _assert_resume_is_bit_exact(cls, kw, params, grads, options, 4, same_selection)


def test_compact_bad_state_dict_is_refused_and_changes_nothing():
    params = _params()
    opt = sparse_grad.sparsify(torch.optim.NAdam(params, lr=0.1), density=0.5, block_size=BLOCK,
                               state_layout="compact")
    _run(opt, params, _grads(params, 2))
    good = snapshot(opt.state_dict())
    before = snapshot((params, opt.state_dict()))

    def compact(sd):
        return sd["param_groups"][0]["sparse_grad"]["compact"]

    cases = [
        (lambda sd: compact(sd).update(exp_avg=compact(sd)["exp_avg"][:, :4]), "exp_avg"),
        (lambda sd: compact(sd).update(exp_avg_sq=compact(sd)["exp_avg_sq"].double()), "exp_avg_sq"),
        (lambda sd: compact(sd).update(block_mu_product=compact(sd)["block_mu_product"][:1]), "block_mu_product"),
        (lambda sd: compact(sd).pop("block_mu_product"), "must hold"),
        (lambda sd: compact(sd)["slot_of_block"].roll(1), None),  # no change: a copy (sanity of the harness)
        (lambda sd: compact(sd).update(slot_of_block=compact(sd)["slot_of_block"].roll(1)), "slot_of_block"),
        (lambda sd: compact(sd)["block_of_slot"].flip(0).clone(), None),
        (lambda sd: compact(sd).update(block_of_slot=compact(sd)["block_of_slot"].flip(0).clone()), "ascending"),
        (lambda sd: compact(sd)["block_step"].fill_(-1), "step counts"),
        (lambda sd: compact(sd)["exp_avg_sq"].fill_(-1.0), "negative"),
        (lambda sd: compact(sd).update(param_numels=torch.tensor([37, 35, 3, 2])), "37|35|2"),
        (lambda sd: sd["param_groups"][0]["sparse_grad"].pop("compact"), "no compact state"),
        (lambda sd: sd["param_groups"][0].update(state_layout="dense"), "state_layout"),
        (lambda sd: sd["state"].update({0: {"block_step": torch.zeros(5, dtype=torch.int32)}}), "compact"),
        (lambda sd: sd["param_groups"][0]["sparse_grad"]["selection"].update(
            block_ids=sd["param_groups"][0]["sparse_grad"]["selection"]["block_ids"][:-1]), "other blocks|does not fit"),
    ]
    for edit, message in cases:
        sd = snapshot(good)
        edit(sd)
        if message is None:
            opt.load_state_dict(sd)
        else:
            with pytest.raises(ValueError, match=message):
                opt.load_state_dict(sd)
        assert_same((params, opt.state_dict()), before)


def test_compact_state_memory_follows_the_density():
    """Per param: (buffers) · (bytes per element) · density, plus the blocks' padding and the slot
    table (4 B per block, 8 + 4 (+ 4 for NAdam's mu_product) per slot, 8 per param)."""
    shapes, block = [(4096,), (1000,), (33, 17), (7,)], 64
    numel = sum(torch.Size(s).numel() for s in shapes)
    blocks = sum(-(-torch.Size(s).numel() // block) for s in shapes)
    for cls, kw in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params = _params(dtype, shapes)
            opt = sparse_grad.sparsify(cls(params, **kw), density=0.1, block_size=block, state_layout="compact")
            _run(opt, params, _grads(params, 2))
            slabs = _compact(opt)
            buffers = sum(1 for key, value in slabs.items() if value.dim() == 2)
            assert buffers == len(opt._rule.state_keys(opt.param_groups[0]))
            slots = ops.num_selected(0.1, blocks)
            assert slabs["block_of_slot"].numel() == slots
            size = dtype.itemsize
            per_slot = 8 + 4 + 4 * ("block_mu_product" in slabs)
            # slots · block ≤ density · blocks · block + block, and blocks · block ≤ numel + tensors · block
            bound = (buffers * size * (0.1 * (numel + len(shapes) * block) + block)
                     + 4 * blocks + per_slot * slots + 8 * len(shapes))
            held = sum(t.numel() * t.element_size() for t in slabs.values())
            assert held <= bound
            dense = buffers * size * numel + 4 * blocks
            assert held <= 0.2 * dense + 4 * blocks + per_slot * slots + 8 * len(shapes)


def test_compact_refusals_write_nothing():
    a, b = _params()[:2]
    opt = sparse_grad.sparsify(torch.optim.Adam([a, b.to(torch.bfloat16)], lr=0.1), density=0.5, block_size=BLOCK,
                               state_layout="compact")
    for p in opt.param_groups[0]["params"]:
        p.grad = heavy_tailed(p.shape, p.dtype)
    before = snapshot(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match="one state dtype per group"):
        opt.step()
    assert_same(opt.param_groups[0]["params"], before)
    assert _compact(opt) is None and not opt.state
    params = _params()
    opt = sparse_grad.sparsify(torch.optim.SGD(params, lr=0.1), density=0.5, block_size=BLOCK, state_layout="compact")
    _run(opt, params, _grads(params, 2))
    opt.param_groups[0]["momentum"] = 0.9  # a buffer the option now needs: a fresh slab (lazy: from the grad)
    _run(opt, params, _grads(params, 1))
    assert _compact(opt)["momentum_buffer"].shape == (ops.num_selected(0.5, 12), BLOCK)
    before = snapshot((params, opt.state_dict()))
    opt.param_groups[0]["block_size"] = 4
    with pytest.raises(ValueError, match="block_size"):
        opt.step()
    opt.param_groups[0]["block_size"] = BLOCK
    opt.param_groups[0]["state_layout"] = "dense"
    with pytest.raises(ValueError, match="compact state"):
        opt.step()
    assert_same((params, opt.state_dict()["state"]), (before[0], before[1]["state"]))


# --- per-step overhead: Python calls per step against the number of tensors ---

def _calls_per_step(n, layout, every, spread):
    """Steady-state Python calls per step, averaged over two selection intervals, for ``n``
    tensors of 4 blocks. ``spread``: one block of every tensor selected (scope "tensor");
    else 4 blocks, all in the first tensor (its grad dominates), whatever ``n``."""
    from sparse_grad.bench import python_calls
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(4 * 64, generator=generator) for _ in range(n)]
    for j, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=generator) * (100.0 if j == 0 and not spread else 1.0)
    opt = sparse_grad.sparsify(torch.optim.AdamW(params, lr=1e-3), density=0.25 if spread else 1.0 / n,
                               scope="tensor" if spread else "global", block_size=64, reselect_every=every,
                               state_layout=layout)
    for _ in range(3):
        opt.step()  # state made, caches filled
    calls = [python_calls(opt.step) for _ in range(2 * every)]
    return sum(calls) / len(calls)


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("every", [1, 10])
def test_python_calls_per_step_follow_the_selected_tensors_not_all_tensors(layout, every):
    """A bound step checks nothing per tensor (one fingerprint of the group), and the selected
    blocks are located and their step counts read with a constant number of calls: the calls of a
    step grow with the tensors that have selected blocks, not with the group's tensors."""
    assert _calls_per_step(16, layout, every, spread=False) == _calls_per_step(8, layout, every, spread=False)
    # Each tensor with selected blocks costs what touches it alone: its piece (~5 calls: the
    # block ids as a slice or index), a view and a gather of each list taken (param, grad, two
    # AdamW buffers: 2-3 calls each), a view and a scatter of each written back (param and
    # buffers: ~4 each), and its count update (~3): about 36 (measured 36-36.5). Torch's
    # functional runs once per cohort on joined buffers, so its own loop adds nothing per tensor.
    few, many = _calls_per_step(8, layout, every, spread=True), _calls_per_step(16, layout, every, spread=True)
    assert 0 < many - few <= 40 * 8


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_a_bound_step_sees_changes_made_by_hand(layout):
    """After steps that reuse the bound group: a resized param, a param converted to another
    dtype and a param added to the group are each seen, before anything is written."""
    params = _params(shapes=[(37,), (5, 7), (3,)])
    opt = sparse_grad.sparsify(torch.optim.Adam(params, lr=0.1), density=0.5, block_size=BLOCK, state_layout=layout)
    _run(opt, params, _grads(params, 3))
    before = snapshot((params, opt.state_dict()))
    params[1].data = heavy_tailed((6, 7))
    params[1].grad = heavy_tailed((6, 7))
    with pytest.raises(ValueError, match="resized"):
        opt.step()
    params[1].data, params[1].grad = before[0][1].clone(), heavy_tailed((5, 7))
    assert_same(opt.state_dict(), before[1])
    if layout == "compact":
        for p in params:
            p.data, p.grad = p.data.to(torch.bfloat16), heavy_tailed(p.shape, torch.bfloat16)
        with pytest.raises(ValueError, match="converted by hand"):
            opt.step()
        for p, old in zip(params, before[0]):
            p.data, p.grad = old.clone(), heavy_tailed(p.shape)
        assert_same(opt.state_dict(), before[1])
    extra = heavy_tailed((9,))
    opt.param_groups[0]["params"].append(extra)
    extra.grad = heavy_tailed((9,))
    if layout == "compact":  # its slot table was made for the params it had
        with pytest.raises(ValueError, match="made for"):
            opt.step()
    else:
        opt.step()  # stepped with fresh state, like any new param
        assert opt.state[extra]["block_step"].sum() <= 2


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_the_step_holds_no_grad_past_its_end(layout):
    """The bound step keeps no grad: after zero_grad(set_to_none=True) the grads are freed."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 7))
    opt = sparse_grad.sparsify(torch.optim.Adam(model.parameters(), lr=1e-3), density=0.3, block_size=16,
                               reselect_every=2, state_layout=layout)
    assert_step_frees_grads(model, opt, heavy_tailed((9, 24)))
