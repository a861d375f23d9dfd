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
from _utils import assert_same, heavy_tailed, snapshot

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


@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[4], CASES[8], CASES[11]], ids=[IDS[2], IDS[4], IDS[8], IDS[11]])
def test_resume_mid_interval_is_bit_exact(cls, kw):
    params = _params()
    grads = _grads(params, 6)
    options = {"density": 0.4, "block_size": BLOCK, "reselect_every": 3, "selection": "random", "seed": 5}
    straight = snapshot(params)
    _run(sparse_grad.sparsify(cls(straight, **kw), **options), straight, grads)

    first = snapshot(params)
    opt = sparse_grad.sparsify(cls(first, **kw), **options)
    _run(opt, first, grads[:2])
    buffer = io.BytesIO()
    torch.save({"params": first, "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = saved["params"]
    again = sparse_grad.sparsify(cls(resumed, **kw), **options)
    again.load_state_dict(saved["opt"])
    assert again.state[resumed[0]]["block_step"].dtype == torch.int32
    _run(again, resumed, grads[2:])
    assert_same(resumed, straight)


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
