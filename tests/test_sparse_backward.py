"""sparse_grad.nn.sparse_backward: the same parameters as without it, while computing only the
weight gradients the next step reads; plan_next_step; refusals."""
from __future__ import annotations

import pytest
import torch
from _utils import TOLERANCES, assert_same, heavy_tailed, snapshot
from torch import nn

import sparse_grad
from sparse_grad import SparseAdamW
from sparse_grad.nn import sparse_backward

STEPS = 12  # reselect_every=10 reselects once after the first step
# The trajectories are compared in float64. sparse_backward computes a weight's selected rows
# with a smaller GEMM than the full one, so a gradient element may differ in its last bits (its
# sum over the batch added in another order); where that sum cancels, the relative difference
# is far larger, and Adam, which normalizes the gradient, carries it into the update whole: in
# float32 one element in a few thousand drifts past 1e-6 after 12 steps. In float64 the same
# amplification stays some orders of magnitude inside TOLERANCES[float64]. (The gradients
# themselves are compared in float32 in test_grads_exact_on_selected_rows_and_input_grad_complete,
# and bfloat16 runs in test_same_params_other_dtypes.)
DTYPE = torch.float64


def mlp(dtype=torch.float32) -> nn.Module:
    """Odd sizes: a 481-element weight (partial last block of 16), rows shorter and longer than a
    block, a 6-element weight smaller than a block, a frozen-free LayerNorm."""
    return nn.Sequential(nn.Linear(13, 37), nn.GELU(), nn.Linear(37, 29), nn.LayerNorm(29), nn.Linear(29, 3),
                         nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def batches(dtype, steps=STEPS, batch=(5, 3), device="cpu"):
    return [heavy_tailed((*batch, 13), dtype, device) for _ in range(steps)]


def train(options: dict, use, dtype=torch.float32, autocast=False, accumulate=1, data=None):
    """Params after STEPS steps, from a fixed init, with or without sparse_backward (``use``:
    False, True, or "compact" for compact_grads=True); also the fraction of weight-gradient rows
    left at zero over the steps (the sparse path ran; a weight without a .grad counts whole)."""
    torch.manual_seed(0)
    device = data[0].device  # the case's device: the backends that run there
    model = mlp(dtype).to(device)
    opt = SparseAdamW(model.parameters(), lr=1e-2, block_size=16, **options)
    handle = sparse_backward(model, opt, compact_grads=use == "compact") if use else None
    zero_rows = total_rows = 0
    for x in data:
        for part in x.chunk(accumulate):
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss = model(part).float().square().mean()
            loss.backward()
        for m in model:
            if isinstance(m, nn.Linear):
                grad = m.weight.grad
                zero_rows += m.weight.shape[0] if grad is None else int((grad == 0).all(dim=1).sum())
                total_rows += m.weight.shape[0]
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return [p.detach().clone() for p in model.parameters()], zero_rows / total_rows


def assert_close_params(got, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


USES = [pytest.param(True, id="full-grads"), pytest.param("compact", id="compact-grads")]


def only_some_under_the_interpreter(case, keep: bool) -> None:
    """Under the interpreter (about 10 s a case) the Triton backend runs the cases that reach its
    own code: compact grads (the update reads the slab) with both state layouts, reselections
    between steps, 16-bit params. The others are the same Python on every backend (full grads
    are plain tensors), run on the reference and cpp backends here, and on CUDA in full."""
    if case == ("cpu", "triton") and not keep:
        pytest.skip("under the interpreter the Triton backend runs a subset (see only_some_under_the_interpreter)")


@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("reselect_every", [1, 3, 10])
def test_same_params_as_without(case, reselect_every, layout, use):
    only_some_under_the_interpreter(case, reselect_every == 3)
    device, backend = case
    data = batches(DTYPE, device=device)
    options = {"density": 0.2, "reselect_every": reselect_every, "state_layout": layout, "backend": backend}
    expected, _ = train(options, False, DTYPE, data=data)
    got, zero_rows = train(options, use, DTYPE, data=data)
    assert_close_params(got, expected, DTYPE)
    if reselect_every == 1:
        assert zero_rows == 0  # every step reselects: full gradients
    else:
        assert zero_rows > 0.2  # most steps computed the selected rows only


@pytest.mark.parametrize("options", [
    {"error_feedback": True}, {"max_grad_norm": 0.05}, {"score_ema": 0.5, "scope": "tensor"},
    {"min_blocks_per_tensor": 2, "state_layout": "compact"}, {"selection": "random", "seed": 3},
    {"density": 1.0}], ids=lambda o: "-".join(map(str, o.items())))
@pytest.mark.parametrize("use", USES)
def test_same_params_with_options(case, options, use):
    only_some_under_the_interpreter(case, use == "compact" and options.get("density") != 1.0
                                    and "selection" not in options)
    device, backend = case
    data = batches(DTYPE, device=device)
    options = {"density": 0.2, "reselect_every": 3, "backend": backend, **options}
    expected, _ = train(options, False, DTYPE, data=data)
    got, zero_rows = train(options, use, DTYPE, data=data)
    assert_close_params(got, expected, DTYPE)
    needs_all = options["density"] == 1.0 or options.get("error_feedback") or options.get("max_grad_norm")
    assert (zero_rows == 0) if needs_all else (zero_rows > 0.2)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("use", USES)
def test_same_params_other_dtypes(case, dtype, use, layout):
    only_some_under_the_interpreter(case, use == "compact")
    device, backend = case
    data = batches(dtype, device=device)
    options = {"density": 0.2, "reselect_every": 4, "backend": backend, "state_layout": layout}
    expected, _ = train(options, False, dtype=dtype, data=data)
    got, zero_rows = train(options, use, dtype=dtype, data=data)
    assert_close_params(got, expected, dtype)
    assert zero_rows > 0.2


@pytest.mark.parametrize("use", USES)
def test_same_params_under_bf16_autocast_and_accumulation(case, use):
    only_some_under_the_interpreter(case, use == "compact")
    device, backend = case
    data = batches(torch.float32, batch=(6, 3), device=device)
    options = {"density": 0.2, "reselect_every": 3, "backend": backend, "state_dtype": torch.float32}
    expected, _ = train(options, False, autocast=True, accumulate=2, data=data)
    got, zero_rows = train(options, use, autocast=True, accumulate=2, data=data)
    # bf16 GEMMs: a row's gradient may round differently when gathered; Adam steps of lr 1e-2
    assert_close_params(got, expected, torch.bfloat16)
    assert zero_rows > 0.2


def test_grads_exact_on_selected_rows_and_input_grad_complete():
    torch.manual_seed(0)
    model = mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, block_size=16, density=0.1, reselect_every=5, backend="reference")
    x = heavy_tailed((7, 13)).requires_grad_()
    model(x).square().sum().backward()
    opt.step()
    reference = {id(p): g for p, g in zip(model.parameters(), torch.autograd.grad(
        model(x).square().sum(), [x, *model.parameters()])[1:])}
    full_dx = torch.autograd.grad(model(x).square().sum(), x)[0]
    opt.zero_grad()
    x.grad = None
    with sparse_backward(model, opt):
        plans = opt.plan_next_step()
        assert not plans[0].reselects and not plans[0].reads_all
        model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, full_dx, atol=1e-6, rtol=1e-5)
    layout = sparse_grad.BlockLayout(plans[0].params, plans[0].block_size)
    owner = layout.tensor_of_block(plans[0].block_ids)
    skipped = 0
    for t, p in enumerate(plans[0].params):
        flat, expected = p.grad.reshape(-1), reference[id(p)].reshape(-1)
        touched = torch.zeros(p.numel(), dtype=torch.bool)
        for b in (plans[0].block_ids[owner == t] - layout.block_range(t)[0]).tolist():
            sl = slice(b * 16, min((b + 1) * 16, p.numel()))
            torch.testing.assert_close(flat[sl], expected[sl], atol=1e-6, rtol=1e-5)
            touched[sl] = True
        if p.dim() == 2:  # rows no selected block touches are zero
            untouched_rows = ~touched.view(p.shape).any(dim=1)
            assert (p.grad[untouched_rows] == 0).all()
            skipped = skipped + int(untouched_rows.sum())
    assert skipped > 0
    assert "forward" not in model[0].__dict__  # the handle left with its block


def test_plan_next_step():
    torch.manual_seed(0)
    model = mlp()
    opt = SparseAdamW(model.parameters(), density=0.2, block_size=16, reselect_every=3)
    plans = opt.plan_next_step()
    assert len(plans) == 1 and plans[0].reselects and plans[0].reads_all and plans[0].block_ids is None
    for expected_reselect in (True, False, False, True, False):
        plan = opt.plan_next_step()[0]
        assert plan.reselects == expected_reselect and plan.reads_all == expected_reselect
        for p in model.parameters():
            p.grad = heavy_tailed(p.shape)
        opt.step()
        if not expected_reselect:
            assert plan.block_ids is opt.selected_blocks()[0][2]
    opt.param_groups[0]["max_grad_norm"] = 1.0
    plan = opt.plan_next_step()[0]
    assert plan.reads_all and not plan.reselects and "max_grad_norm" in plan.reason
    opt.param_groups[0]["max_grad_norm"] = None
    handle = opt.register_score_hook(lambda *args: None)
    assert "score hook" in opt.plan_next_step()[0].reason
    handle.remove()
    opt.param_groups[0]["density"] = 0.3  # a changed option reselects
    assert opt.plan_next_step()[0].reselects


def test_step_refused_when_plan_changes_after_forward():
    torch.manual_seed(0)
    model = mlp()
    opt = SparseAdamW(model.parameters(), density=0.2, block_size=16, reselect_every=4)
    x = heavy_tailed((4, 13))
    handle = sparse_backward(model, opt)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()
    opt.param_groups[0]["density"] = 0.5  # after the forward: the step would reselect on partial grads
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with pytest.raises(RuntimeError, match="sparse_backward computed .* selected blocks only.*reselects"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="sparse_backward computed"):  # again, without a new backward
        opt.step()
    opt.zero_grad()
    model(x).sum().backward()  # run again: the new plan reads everything
    opt.step()
    handle.remove()


def test_bad_input_and_remove():
    model = mlp()
    opt = SparseAdamW(model.parameters(), block_size=16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparse_backward(opt, opt)
    with pytest.raises(TypeError, match="optimizer must be a sparse_grad.SparseAdamW"):
        sparse_backward(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="no nn.Linear whose weight"):
        sparse_backward(nn.Sequential(nn.LayerNorm(4)), opt)
    handle = sparse_backward(model, opt)
    with pytest.raises(ValueError, match=r"model.0 is already patched"):
        sparse_backward(model, opt)
    assert not opt._optimizer_step_pre_hooks or len(opt._optimizer_step_pre_hooks) == 1
    handle.remove()
    assert all("forward" not in m.__dict__ and not hasattr(m, "_sparse_grad_backward") for m in model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    handle.remove()  # twice: nothing left to do
    own = model[0].forward = lambda x: torch.zeros(())  # an instance forward set before is kept
    with sparse_backward(model, opt):
        pass
    assert model[0].forward is own


def test_eval_and_frozen_weights_use_the_layers_own_forward():
    torch.manual_seed(0)
    model = mlp()
    model[2].weight.requires_grad_(False)
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], density=0.2, block_size=16,
                      reselect_every=3)
    x = heavy_tailed((4, 13))
    with sparse_backward(model, opt) as handle:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model(x)
        assert not handle._used
        model(x).sum().backward()
        assert id(model[0].weight) in handle._used and id(model[2].weight) not in handle._used
        assert model[2].weight.grad is None
        opt.step()


def test_under_torch_compile():
    data = batches(DTYPE, steps=6)
    options = {"density": 0.2, "reselect_every": 3}
    expected, _ = train(options, False, DTYPE, data=data)
    torch.manual_seed(0)
    model = mlp(DTYPE)
    opt = SparseAdamW(model.parameters(), lr=1e-2, block_size=16, **options)
    compiled = torch.compile(model)
    with sparse_backward(model, opt):
        for x in data:
            compiled(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch._dynamo.reset()
    assert_close_params([p.detach() for p in model.parameters()], expected, DTYPE)
    with sparse_backward(model, opt), pytest.raises(Exception, match="sparse_backward runs the patched Linear"):
        torch.compile(model, fullgraph=True)(data[0])
    torch._dynamo.reset()


def test_hf_model_linear_layers_are_patched():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

    def run(use):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(DTYPE)
        groups = sparse_grad.param_groups(model, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                          density=0.1, min_sparse_size=64)
        opt = SparseAdamW(groups, lr=1e-3, block_size=64, reselect_every=3)
        handle = sparse_backward(model, opt) if use else None
        g = torch.Generator().manual_seed(5)
        for _ in range(7):
            ids = torch.randint(0, 61, (2, 11), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            assert len(handle.layers) == 8  # 4 targeted Linear layers × 2 layers
            handle.remove()
        return [p.detach().clone() for p in model.parameters()]

    assert_close_params(run(True), run(False), DTYPE)


def _fsdp2_refused(rank, world):
    from _distributed import fsdp, model
    net = fsdp(model(), world)
    opt = SparseAdamW(net.parameters(), block_size=16)
    try:
        sparse_backward(net, opt)
    except ValueError as e:
        return str(e)
    return None


def test_fsdp2_refused(tmp_path):
    from _distributed import spawn
    message, = spawn(_fsdp2_refused, 1, tmp_path)
    assert message is not None and "DTensor (FSDP2" in message


@pytest.mark.parametrize("shape,block_size", [((37, 13), 16), ((29, 37), 16), ((3, 2), 16), ((7, 5), 4),
                                              ((11, 64), 64), ((5, 100), 7)])
def test_rows_of_blocks_are_the_rows_the_blocks_touch(shape, block_size):
    from sparse_grad.nn.selected_rows import rows_of_blocks
    rows, cols = shape
    numel = rows * cols
    blocks = -(-numel // block_size)
    first = 3  # the tensor's blocks start after another tensor's
    ids = torch.randperm(blocks)[:max(1, blocks // 3)].sort().values + first
    ids = torch.cat([torch.tensor([0, 1]), ids, torch.tensor([first + blocks, first + blocks + 5])])  # others'
    touched = torch.zeros(numel, dtype=torch.bool)
    for b in (ids[(ids >= first) & (ids < first + blocks)] - first).tolist():
        touched[b * block_size:(b + 1) * block_size] = True
    expected = touched.view(rows, cols).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(rows_of_blocks(ids, first, first + blocks, numel, cols, block_size, rows), expected)


def test_same_params_under_grad_scaler(case):
    device, backend = case
    data = batches(DTYPE, device=device)

    def run(use):
        torch.manual_seed(0)
        model = mlp(DTYPE).to(device)
        opt = SparseAdamW(model.parameters(), lr=1e-2, block_size=16, density=0.2, reselect_every=3,
                          state_layout="compact", backend=backend)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
        handle = sparse_backward(model, opt) if use else None
        for x in data:
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    (expected, scale), (got, got_scale) = run(False), run(True)
    assert got_scale == scale
    assert_close_params(got, expected, DTYPE)


def _compact_step_ready(options=None, dtype=torch.float32):
    """A model and optimizer one step in (a selection made), the handle with compact grads, and
    a forward and backward done: the next step reads the compact grads."""
    torch.manual_seed(0)
    model = mlp(dtype)
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.2, block_size=16, reselect_every=4,
                      **(options or {}))
    handle = sparse_backward(model, opt, compact_grads=True)
    x = heavy_tailed((4, 13), dtype)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    model(x).square().mean().backward()
    return model, opt, handle, x


def _weights(model):
    return [m.weight for m in model if isinstance(m, nn.Linear)]


def test_compact_grads_leave_weight_grads_none_and_the_slab_in_selection_order():
    model, opt, handle, x = _compact_step_ready()
    (_, params, ids, block_size), = opt.selected_blocks()
    assert all(w.grad is None for w in _weights(model))
    assert all(p.grad is not None for p in model.parameters() if p.dim() == 1)  # biases, LayerNorm: full
    slab = opt.compact_grad(0, [])
    assert slab.shape == (ids.numel(), block_size)
    # Row i is block ids[i]'s gradient: torch's full gradient, gathered.
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    reference(x).square().mean().backward()
    flat = torch.cat([torch.nn.functional.pad(p.grad.reshape(-1), (0, -p.numel() % block_size))
                      for p in reference.parameters()]).view(-1, block_size)[ids]
    lengths = torch.tensor([min(block_size, n - (b - f) * block_size) for b in ids.tolist()
                            for f, n in [_first_and_numel(params, b, block_size)]])
    weight_rows = torch.tensor([any(p is w for w in _weights(model)) for b in ids.tolist()
                                for p in [_param_of(params, b, block_size)]])
    for i in weight_rows.nonzero().squeeze(1).tolist():
        torch.testing.assert_close(slab[i, :lengths[i]], flat[i, :lengths[i]], rtol=1e-5, atol=1e-7)
        assert torch.all(slab[i, lengths[i]:] == 0)  # a partial block's tail stays zero
    handle.remove()


def _first_and_numel(params, block, block_size):
    first = 0
    for p in params:
        blocks = -(-p.numel() // block_size)
        if block < first + blocks:
            return first, p.numel()
        first += blocks
    raise AssertionError(block)


def _param_of(params, block, block_size):
    first = 0
    for p in params:
        first += -(-p.numel() // block_size)
        if block < first:
            return p
    raise AssertionError(block)


def test_compact_grads_memory_is_density_times_the_weights():
    """On a step between reselections the weights' gradient is the slab only: its bytes are the
    selected blocks' (≤ ⌈density · blocks⌉ · block_size elements), not the weights' size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    density, block_size = 0.05, 64
    opt = SparseAdamW(model.parameters(), density=density, block_size=block_size, reselect_every=10,
                      state_layout="compact")
    handle = sparse_backward(model, opt, compact_grads=True)
    for step in range(3):
        for _ in range(2):  # accumulation: the same slab, no full-size grad at any point
            model(heavy_tailed((8, 256))).square().mean().backward()
        weights = _weights(model)
        if step > 0:
            assert all(w.grad is None for w in weights)
            slab = opt.compact_grad(0, [])
            blocks = sum(-(-p.numel() // block_size) for p in model.parameters())
            weight_bytes = sum(w.numel() * w.element_size() for w in weights)
            grad_bytes = slab.numel() * slab.element_size()
            assert grad_bytes <= -(-blocks * density // 1) * block_size * slab.element_size()
            assert grad_bytes < 0.06 * weight_bytes + block_size * slab.element_size() * len(weights)
        opt.step()
        opt.zero_grad()
    handle.remove()


def test_compact_grads_under_grad_scaler_are_refused():
    model, opt, handle, x = _compact_step_ready()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    before = snapshot([list(model.parameters()), opt.state_dict()])
    with pytest.raises(RuntimeError, match="GradScaler.*refused and changed nothing"):
        scaler.step(opt)
    assert_same([list(model.parameters()), opt.state_dict()], before)
    # unscale_ first (as before clip_grad_norm_): it skips the weights (no .grad); the step refuses
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="GradScaler.*refused and changed nothing"):
        scaler.step(opt)
    handle.remove()


def test_compact_grad_refusals():
    model, opt, handle, x = _compact_step_ready()
    with pytest.raises(ValueError, match="not one of the params"):
        opt.compact_grad(0, [torch.zeros(3)])
    with pytest.raises(ValueError, match="param group index"):
        opt.compact_grad(1, [])
    fresh = SparseAdamW(mlp().parameters(), block_size=16)
    with pytest.raises(ValueError, match="reads every block's gradient"):
        fresh.compact_grad(0, [])
    sgd = sparse_grad.SparseSGD(mlp().parameters(), lr=0.1, block_size=16)
    with pytest.raises(TypeError, match="compact grads"):
        sgd.compact_grad(0, [])
    mixed = mlp()
    mixed[0].double()
    with pytest.raises(ValueError, match="one dtype per group"):
        opt_mixed = SparseAdamW(mixed.parameters(), density=0.2, block_size=16, reselect_every=4)
        for p in mixed.parameters():
            p.grad = torch.ones_like(p)
        opt_mixed.step()
        opt_mixed.compact_grad(0, [])
    with pytest.raises(TypeError, match="compact_grads must be a bool"):
        sparse_backward(mlp(), opt, compact_grads=1)
    handle.remove()


def test_step_refused_when_the_compact_grad_no_longer_fits():
    """Changed after the backward, the step would reselect: refused before anything changes
    (the optimizer's own check; the handle's pre-hook says the same first)."""
    model, opt, handle, x = _compact_step_ready()
    handle.remove()  # the optimizer alone
    opt.param_groups[0]["density"] = 0.5
    before = snapshot([list(model.parameters()), opt.state_dict()])
    with pytest.raises(RuntimeError, match="compact gradient .*reselects.*refused and changed nothing"):
        opt.step()
    assert_same([list(model.parameters()), opt.state_dict()], before)
    opt.zero_grad()  # drops the slab: the next backward computes full gradients, and the step runs
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("full", ["max_grad_norm", "error_feedback", "score_hook"])
def test_options_that_read_every_gradient_keep_full_grads(full):
    torch.manual_seed(0)
    model = mlp()
    opt = SparseAdamW(model.parameters(), density=0.2, block_size=16, reselect_every=4,
                      **({"max_grad_norm": 1.0} if full == "max_grad_norm" else
                         {"error_feedback": True} if full == "error_feedback" else {}))
    if full == "score_hook":
        opt.register_score_hook(lambda *args: None)
    with sparse_backward(model, opt, compact_grads=True):
        for _ in range(3):
            model(heavy_tailed((4, 13))).sum().backward()
            assert all(w.grad is not None for w in _weights(model))
            assert all(plan.reads_all for plan in opt.plan_next_step())
            opt.step()
            opt.zero_grad()
