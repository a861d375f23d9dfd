"""SparseSGD and SparseLion: the ops on every backend against the reference, the reference against
torch.optim.SGD and a written-out Lion, the optimizers' state dicts and their argument checks.
CUDA tests (names with "cuda") skip without a GPU."""
import copy
import io
import math

import pytest
import torch

import sparse_grad
from sparse_grad import SparseLion, SparseSGD, ops
from _utils import TOLERANCES, assert_same, heavy_tailed, snapshot

SHAPES = [(37,), (5, 13), (1,), (0,), (3, 3, 3), (16,)]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.float64, torch.float64)]
SGD_VARIANTS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                dict(momentum=0.8, dampening=0.3, weight_decay=0.05), dict(momentum=0.9, maximize=True),
                dict(momentum=0.0, weight_decay=0.1, maximize=True)]


def blocks_of(shapes, block_size):
    return sum((math.prod(s) + block_size - 1) // block_size for s in shapes)


def make(shapes, block_size, param_dtype, grad_dtype, device, state_dtype=None):
    params = [heavy_tailed(s, param_dtype, device) for s in shapes]
    grads = [heavy_tailed(s, grad_dtype, device) for s in shapes]
    moments = [heavy_tailed(s, state_dtype or param_dtype, device) * 0.1 for s in shapes]
    # Counts 0..2: a count of 0 makes the next update the block's first (SGD copies the grad).
    steps = [torch.randint(0, 3, ((math.prod(s) + block_size - 1) // block_size,), dtype=torch.int32,
                           device=device) for s in shapes]
    return params, grads, moments, steps


def random_ids(n, k, device):
    return torch.sort(torch.randperm(n)[:k]).values.to(device)


def run_op(kind, backend, state, ids, block_size, hyper, compact=False, coef=None, found_inf=None):
    params, grads, moments, steps = state
    if kind == "sgd":
        buffers = moments if hyper.get("momentum", 0.0) else []
        ops.sparse_sgd_step(params, grads, buffers, steps, ids, block_size=block_size, backend=backend,
                            grad_coef=coef, found_inf=found_inf, compact=compact, **hyper)
    else:
        ops.sparse_lion_step(params, grads, moments, steps, ids, block_size=block_size, backend=backend,
                             grad_coef=coef, found_inf=found_inf, compact=compact, **hyper)


OP_CASES = [("sgd", dict(lr=0.05, **v)) for v in SGD_VARIANTS] + [
    ("lion", dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)),
    ("lion", dict(lr=0.003, beta1=0.95, beta2=0.98, maximize=True))]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e.cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind, hyper", OP_CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.items())))
@pytest.mark.parametrize("param_dtype, grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [4, 50])
def test_backend_matches_reference(case, kind, hyper, param_dtype, grad_dtype, block_size):
    """Every backend against the reference, dense state, several selections in a row (odd
    shapes, partial blocks, an empty tensor, a clip coefficient)."""
    device, backend = case
    state = make(SHAPES, block_size, param_dtype, grad_dtype, device)
    expected = snapshot(state)
    n = blocks_of(SHAPES, block_size)
    for k in (n, max(1, n // 3), 1):
        ids = random_ids(n, k, device)
        coef = torch.full((1,), 0.7, device=device)
        run_op(kind, backend, state, ids, block_size, hyper, coef=coef)
        run_op(kind, "reference", expected, ids, block_size, hyper, coef=coef)
    assert_close(state[0], expected[0], param_dtype)
    if kind == "lion" or hyper.get("momentum"):
        assert_close(state[2], expected[2], param_dtype)
    assert_same(state[3], expected[3])


@pytest.mark.parametrize("kind, hyper", OP_CASES[:4] + OP_CASES[-1:],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.items())))
def test_compact_equals_dense(case, kind, hyper):
    """Compact slabs give the dense results bit for bit on every backend (same arithmetic)."""
    device, backend = case
    block_size = 8
    state = make(SHAPES, block_size, torch.float32, torch.float32, device)
    n = blocks_of(SHAPES, block_size)
    ids = random_ids(n, n // 2, device)
    params, grads, moments, steps = snapshot(state)
    flat_m = torch.cat([torch.nn.functional.pad(m.reshape(-1), (0, (-m.numel()) % block_size)) for m in moments])
    slab = flat_m.view(-1, block_size)[ids].clone()
    slab_steps = torch.cat(steps)[ids].clone()
    run_op(kind, backend, (params, grads, [slab], [slab_steps]), ids, block_size, hyper, compact=True)
    run_op(kind, backend, state, ids, block_size, hyper)
    assert_same(params, state[0])
    dense_m = torch.cat([torch.nn.functional.pad(m.reshape(-1), (0, (-m.numel()) % block_size))
                         for m in state[2]]).view(-1, block_size)[ids]
    if kind == "lion" or hyper.get("momentum"):
        assert_same(slab, dense_m)
    assert_same(slab_steps, torch.cat(state[3])[ids])


@pytest.mark.parametrize("kind", ["sgd", "lion"])
def test_unselected_blocks_and_found_inf_untouched(case, kind):
    device, backend = case
    block_size = 5
    state = make(SHAPES, block_size, torch.float32, torch.float32, device)
    n = blocks_of(SHAPES, block_size)
    hyper = dict(lr=0.1, momentum=0.9) if kind == "sgd" else dict(lr=0.1)
    before = snapshot(state)
    run_op(kind, backend, state, random_ids(n, n, device), block_size, hyper, found_inf=torch.ones(1, device=device))
    assert_same(state, before)
    ids = torch.tensor([0, 3], device=device)
    run_op(kind, backend, state, ids, block_size, hyper)
    flat_before = torch.cat([p.reshape(-1) for p in before[0]])
    flat_after = torch.cat([p.reshape(-1) for p in state[0]])
    touched = torch.zeros_like(flat_after, dtype=torch.bool)
    for b in ids.tolist():
        touched[b * block_size:(b + 1) * block_size] = True
    assert torch.equal(flat_after[~touched], flat_before[~touched])
    assert not torch.equal(flat_after[touched], flat_before[touched])


def lion_fp64(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize):
    """Lion as the paper's Algorithm 2 writes it, in float64."""
    for p, g, m in zip(params, grads, exp_avgs):
        g = -g if maximize else g
        c = beta1 * m + (1 - beta1) * g
        p.mul_(1 - lr * weight_decay).sub_(lr * torch.sign(c))
        m.mul_(beta2).add_((1 - beta2) * g)


@pytest.mark.parametrize("maximize", [False, True])
def test_lion_matches_the_written_out_formula(case, maximize):
    """Every backend's SparseLion at density 1 against the formula in float64 over 5 steps
    (fp64 params: the arithmetic is the same up to rounding of the last bit)."""
    device, backend = case
    params = [heavy_tailed(s, torch.float64, device) for s in SHAPES]
    mine = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone() for p in params]
    moments = [torch.zeros_like(p) for p in params]
    opt = SparseLion(mine, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, maximize=maximize, density=1.0,
                     block_size=8, backend=backend)
    for _ in range(5):
        grads = [heavy_tailed(p.shape, torch.float64, device) for p in params]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        opt.step()
        lion_fp64(theirs, grads, moments, 0.01, 0.9, 0.99, 0.1, maximize)
    assert_close([p.detach() for p in mine], theirs, torch.float64)
    assert_close([opt.state[p]["exp_avg"] for p in mine], moments, torch.float64)


@pytest.mark.parametrize("options", SGD_VARIANTS, ids=lambda v: "-".join(map(str, v.items())))
@pytest.mark.parametrize("state_layout", ["dense", "compact"])
def test_sparse_sgd_at_density_one_is_torch_sgd(case, options, state_layout):
    """fp32, 6 steps, against torch.optim.SGD (its default, foreach, implementation)."""
    device, backend = case
    params = [heavy_tailed(s, torch.float32, device) for s in SHAPES]
    mine = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = SparseSGD(mine, lr=0.01, density=1.0, block_size=16, backend=backend, state_layout=state_layout,
                    **options)
    ref = torch.optim.SGD(theirs, lr=0.01, **options)
    for _ in range(6):
        for a, b in zip(mine, theirs):
            a.grad = heavy_tailed(a.shape, torch.float32, device)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    assert_close([p.detach() for p in mine], [p.detach() for p in theirs], torch.float32)
    if options["momentum"] and state_layout == "dense":
        assert_close([opt.state[p]["momentum_buffer"] for p in mine],
                     [ref.state[p]["momentum_buffer"] for p in theirs], torch.float32)
    if not options["momentum"]:
        assert all("momentum_buffer" not in opt.state[p] for p in mine)


def test_reference_sgd_is_bit_identical_to_torch_single_tensor_sgd():
    """The oracle is torch's own single-tensor arithmetic on CPU."""
    params = [heavy_tailed(s) for s in SHAPES]
    mine = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = SparseSGD(mine, lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01, density=1.0, block_size=8,
                    backend="reference")
    ref = torch.optim.SGD(theirs, lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False)
    for _ in range(4):
        for a, b in zip(mine, theirs):
            a.grad = heavy_tailed(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    assert_same([p.detach() for p in mine], [p.detach() for p in theirs])


def test_sgd_momentum_starts_per_block():
    """A block's first update copies the gradient into its buffer, whenever it is first selected:
    torch.optim.SGD's first-step rule, per block."""
    p = torch.zeros(8, requires_grad=True)
    opt = SparseSGD([p], lr=1.0, momentum=0.5, dampening=0.5, density=0.5, block_size=4, backend="reference")
    p.grad = torch.tensor([1.0] * 4 + [0.1] * 4)
    opt.step()  # block 0 selected, first update: buffer = grad (no dampening)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.tensor([1.0] * 4 + [0.0] * 4))
    p.grad = torch.tensor([0.1] * 4 + [2.0] * 4)
    opt.step()  # block 1 selected now, its first update: buffer = grad; block 0 kept
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.tensor([1.0] * 4 + [2.0] * 4))
    assert torch.equal(p.detach(), torch.tensor([-1.0] * 4 + [-2.0] * 4))
    p.grad = torch.tensor([3.0] * 4 + [0.0] * 4)
    opt.step()  # block 0 again: 0.5 * 1 + 0.5 * 3 = 2
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.tensor([2.0] * 4 + [2.0] * 4))


@pytest.mark.parametrize("cls, options", [
    (SparseSGD, dict(lr=0.05, momentum=0.9, nesterov=True)), (SparseSGD, dict(lr=0.05)),
    (SparseLion, dict(lr=0.01, weight_decay=0.1))])
@pytest.mark.parametrize("state_layout", ["dense", "compact"])
def test_state_dict_round_trip_is_bit_exact_mid_run(case, cls, options, state_layout):
    device, backend = case
    torch.manual_seed(1)
    shapes = [(23, 3), (40,), (5,)]
    params = [heavy_tailed(s, device=device).requires_grad_() for s in shapes]
    grads = [[heavy_tailed(s, device=device) for s in shapes] for _ in range(6)]
    kw = dict(density=0.3, block_size=8, reselect_every=2, backend=backend, state_layout=state_layout, **options)

    def run(opt, ps, steps):
        for g in steps:
            for p, gg in zip(ps, g):
                p.grad = gg.clone()
            opt.step()

    opt = cls(params, **kw)
    run(opt, params, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    stream = io.BytesIO()  # through torch.save / torch.load(weights_only=True)
    torch.save(saved, stream)
    stream.seek(0)
    loaded = torch.load(stream, weights_only=True)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(resumed_params, **kw)
    resumed.load_state_dict(loaded)
    run(opt, params, grads[3:])
    run(resumed, resumed_params, grads[3:])
    assert_same([p.detach() for p in params], [p.detach() for p in resumed_params])
    assert_same(opt.state_dict()["state"], resumed.state_dict()["state"])


def test_load_refuses_another_optimizers_state():
    p = torch.randn(20, requires_grad=True)
    adamw = sparse_grad.SparseAdamW([p], density=1.0, block_size=8, backend="reference")
    p.grad = torch.randn(20)
    adamw.step()
    sgd = SparseSGD([p.detach().clone().requires_grad_()], momentum=0.9, density=1.0, block_size=8)
    with pytest.raises(ValueError, match="state_dict"):
        sgd.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("cls, kwargs, match", [
    (SparseSGD, dict(lr=-1.0), "lr"),
    (SparseSGD, dict(momentum=-0.1), "momentum"),
    (SparseSGD, dict(nesterov=True), "nesterov"),
    (SparseSGD, dict(momentum=0.9, nesterov=True, dampening=0.1), "nesterov"),
    (SparseSGD, dict(dampening=-1.0), "dampening"),
    (SparseSGD, dict(differentiable=True), "differentiable"),
    (SparseSGD, dict(density=0.0), "density"),
    (SparseLion, dict(betas=(1.0, 0.99)), r"betas.*\[0\]"),
    (SparseLion, dict(betas=(0.9,)), "betas"),
    (SparseLion, dict(weight_decay=-0.1), "weight_decay"),
    (SparseLion, dict(block_size=0), "block_size"),
])
def test_bad_options_are_refused(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [SparseSGD, SparseLion])
def test_bad_option_set_by_hand_leaves_everything_untouched(cls):
    params = [torch.randn(10, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, density=0.5, block_size=4,
              backend="reference")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    def everything():
        sd = opt.state_dict()
        return snapshot((params, sd["state"], [g["sparse_grad"] for g in sd["param_groups"]]))

    before = everything()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]"):
        opt.step()
    assert_same(before, everything())


def test_op_argument_checks():
    p, g = [torch.randn(9)], [torch.randn(9)]
    steps = [torch.zeros(3, dtype=torch.int32)]
    ids = torch.tensor([0, 2])
    before = snapshot((p, steps))
    with pytest.raises(ValueError, match="momentum"):
        ops.sparse_sgd_step(p, g, [], steps, ids, block_size=4, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        ops.sparse_sgd_step(p, g, [torch.zeros(9)], steps, ids, block_size=4, momentum=0.9, nesterov=True,
                            dampening=0.5)
    with pytest.raises(ValueError, match="momentum_buffers"):
        ops.sparse_sgd_step(p, g, [torch.zeros(8)], steps, ids, block_size=4, momentum=0.9)
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.sparse_lion_step(p, g, [torch.zeros(9)], steps, torch.tensor([2, 0]), block_size=4)
    with pytest.raises(ValueError, match="beta2"):
        ops.sparse_lion_step(p, g, [torch.zeros(9)], steps, ids, block_size=4, beta2=1.5)
    with pytest.raises(TypeError, match="exp_avgs"):
        ops.sparse_lion_step(p, g, torch.zeros(9), steps, ids, block_size=4)
    assert_same(before, (p, steps))


def test_opcheck(case):
    device, backend = case
    params = [heavy_tailed(s, device=device) for s in [(37,), (4, 5), (1,)]]
    grads = [heavy_tailed(p.shape, device=device) for p in params]
    steps = [torch.zeros((p.numel() + 7) // 8, dtype=torch.int32, device=device) for p in params]
    ids = torch.tensor([0, 2, 5, 8], device=device)
    hyper = torch.tensor([1e-2, 0.9, 0.0, 0.01], dtype=torch.float64, device=device)
    scalars = (torch.full((1,), 0.5, device=device), torch.zeros(1, device=device))
    for buffers in ([torch.zeros_like(p) for p in params], []):
        torch.library.opcheck(torch.ops.sparse_grad.sparse_sgd_step.default,
                              (params, grads, buffers, steps, ids, hyper, 8, False, bool(buffers), backend))
        torch.library.opcheck(torch.ops.sparse_grad.sparse_sgd_step.default,
                              (params, grads, buffers, steps, ids, hyper, 8, True, False, backend, *scalars))
    lion_hyper = torch.tensor([1e-3, 0.9, 0.99, 0.1], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.sparse_grad.sparse_lion_step.default,
                          (params, grads, [torch.zeros_like(p) for p in params], steps, ids, lion_hyper, 8, False,
                           backend, *scalars))
    compact = ([torch.zeros(4, 8, device=device)], [torch.zeros(4, dtype=torch.int32, device=device)])
    torch.library.opcheck(torch.ops.sparse_grad.sparse_lion_step.default,
                          (params, grads, *compact, ids, lion_hyper, 8, False, backend, None, None, True))


@pytest.mark.parametrize("cls", [SparseSGD, SparseLion])
def test_compiled_step_matches_eager(cls):
    """The new ops trace under torch.compile (fullgraph) through their fake impls."""
    torch._dynamo.reset()
    params = [heavy_tailed(s).requires_grad_() for s in [(37,), (4, 5)]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(lr=torch.tensor(0.01), density=0.5, block_size=8, backend="reference")
    if cls is SparseSGD:
        kw["momentum"] = 0.9
    eager, compiled = cls(params, **kw), cls(twins, **kw)
    step = torch.compile(compiled.step, fullgraph=False)
    for _ in range(3):
        for a, b in zip(params, twins):
            a.grad = heavy_tailed(a.shape)
            b.grad = a.grad.clone()
        eager.step()
        step()
    assert_same([p.detach() for p in params], [p.detach() for p in twins])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind, hyper", OP_CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.items())))
@pytest.mark.parametrize("param_dtype, grad_dtype", DTYPES, ids=str)
def test_cuda_backends_match_reference(backend, kind, hyper, param_dtype, grad_dtype):
    if sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")))
    block_size = 4096
    shapes = [(4096 * 3 + 17,), (129, 65), (1,), (8192,)]
    state = make(shapes, block_size, param_dtype, grad_dtype, "cuda")
    expected = snapshot(state)
    n = blocks_of(shapes, block_size)
    for k in (n, 2):
        ids = random_ids(n, k, "cuda")
        run_op(kind, backend, state, ids, block_size, hyper, coef=torch.full((1,), 0.7, device="cuda"))
        run_op(kind, "reference", expected, ids, block_size, hyper, coef=torch.full((1,), 0.7, device="cuda"))
    assert_close(state[0], expected[0], param_dtype)
    assert_same(state[3], expected[3])


@CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("options", SGD_VARIANTS, ids=lambda v: "-".join(map(str, v.items())))
def test_cuda_sparse_sgd_at_density_one_is_torch_sgd(backend, options):
    if sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")))
    params = [heavy_tailed(s, device="cuda") for s in [(4096 * 2 + 5,), (33, 70)]]
    mine = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = SparseSGD(mine, lr=0.01, density=1.0, backend=backend, **options)
    ref = torch.optim.SGD(theirs, lr=0.01, **options)
    for _ in range(6):
        for a, b in zip(mine, theirs):
            a.grad = heavy_tailed(a.shape, device="cuda")
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    assert_close([p.detach() for p in mine], [p.detach() for p in theirs], torch.float32)


@CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_sparse_lion_step_makes_no_host_sync(backend):
    if sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(sparse_grad.backends.unavailable_reason(backend, torch.device("cuda")))
    params = [heavy_tailed((4096 * 4,), device="cuda").requires_grad_()]
    opt = SparseLion(params, density=0.5, backend=backend)
    params[0].grad = heavy_tailed(params[0].shape, device="cuda")
    opt.step()  # the first step allocates and uploads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls", [SparseSGD, SparseLion])
def test_grad_scaler_unscales_in_the_kernel_and_skips_an_overflow(cls):
    """Under torch.amp.GradScaler the update reads grad / scale, and an overflowed step changes
    nothing (params, state, selection), as for SparseAdamW."""
    kw = dict(lr=0.01, density=0.5, block_size=8, reselect_every=3, backend="reference", error_feedback=True)
    if cls is SparseSGD:
        kw["momentum"] = 0.9
    params = [heavy_tailed(s).requires_grad_() for s in [(37,), (4, 5)]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    scaled, plain = cls(params, **kw), cls(twins, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for step in range(4):
        grads = [heavy_tailed(p.shape) for p in params]
        scale = scaler.scale(torch.ones(()))  # as scaler.scale(loss) would scale the grads
        for p, t, g in zip(params, twins, grads):
            p.grad = g * scale
            t.grad = g.clone()
        if step == 2:  # an overflow: nothing may change
            params[0].grad[3] = float("inf")
            before = snapshot(([p.detach() for p in params], scaled.state_dict()["state"]))
            scaler.step(scaled)
            scaler.update()
            assert_same(before, snapshot(([p.detach() for p in params], scaled.state_dict()["state"])))
            continue
        scaler.step(scaled)
        scaler.update()
        plain.step()
    assert_close([p.detach() for p in params], [p.detach() for p in twins], torch.float32)


@pytest.mark.parametrize("op", ["sparse_sgd_step", "sparse_lion_step"])
def test_public_and_native_schemas_agree(op):
    """The native schema is the public op's, less the backend name (sparse_grad/library.py)."""
    public = getattr(torch.ops.sparse_grad, op).default._schema.arguments
    native = getattr(torch.ops.sparse_grad, "native_" + op).default._schema.arguments
    strip = lambda args: [(a.name, str(a.type)) for a in args if a.name != "backend"]  # noqa: E731
    assert strip(public) == strip(native)


@pytest.mark.parametrize("kind, hyper", [OP_CASES[2], OP_CASES[-2]], ids=["sgd", "lion"])
def test_cpp_is_independent_of_the_thread_count(kind, hyper):
    if sparse_grad.backends.unavailable_reason("cpp", torch.device("cpu")) is not None:
        pytest.skip("the extension is not built")
    block_size = 7
    shapes = [(3 * block_size + 5,), (1,), (0,), (4000,)]
    state = make(shapes, block_size, torch.float32, torch.float32, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            copy_ = snapshot(state)
            ids = torch.arange(0, blocks_of(shapes, block_size), 2)
            run_op(kind, "cpp", copy_, ids, block_size, hyper)
            results.append(copy_)
    finally:
        torch.set_num_threads(threads)
    assert_same(results[0], results[1])


@pytest.mark.parametrize("cls, options", [(SparseSGD, dict(momentum=0.9)), (SparseSGD, dict()),
                                          (SparseLion, dict(weight_decay=0.1))], ids=["sgd-momentum", "sgd", "lion"])
def test_python_calls_per_step_do_not_grow_with_the_tensors(case, cls, options):
    """The bound step of docs/design.md §9 holds for every rule: a constant number of Python
    calls per steady-state step (kernels excluded), within 3 per tensor + 300."""
    from test_host_calls import BLOCK, count_calls, kernels_of, make_params
    device, backend = case
    if backend == "triton":
        pytest.skip("the Triton selection under the interpreter: tests/test_host_calls.py covers the host path")
    calls = []
    for n in (12, 96):
        opt = cls(make_params(n, device), block_size=BLOCK, backend=backend, density=0.05, **options)
        for _ in range(3):  # state created, selection made, the step bound
            opt.step()
        calls.append(count_calls(opt.step, kernels_of(backend)))
        assert calls[-1] <= 3 * n + 300, f"{calls[-1]} Python calls for a step over {n} tensors"
    assert calls[0] == calls[1], f"calls per step grow with the tensors: {calls}"
