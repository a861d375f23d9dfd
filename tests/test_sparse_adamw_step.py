import textwrap

import pytest
import torch

from sparse_grad import ops
from _utils import TOLERANCES, assert_same, assert_script_prints_ok, count_launches, heavy_tailed, snapshot

SHAPES = [(37,), (5, 13), (1,), (0,), (200,), (16,), (3, 3, 3)]


def make_state(shapes, block_size, param_dtype, grad_dtype, device, max_step=3):
    """Params, grads and moments of fresh random data, and mixed per-block step counts."""
    params = [heavy_tailed(s, param_dtype, device) for s in shapes]
    grads = [heavy_tailed(s, grad_dtype, device) for s in shapes]
    exp_avgs = [heavy_tailed(s, param_dtype, device) * 0.1 for s in shapes]
    exp_avg_sqs = [heavy_tailed(s, param_dtype, device).square() * 0.1 for s in shapes]
    steps = [torch.randint(0, max_step, ((p.numel() + block_size - 1) // block_size,),
                           dtype=torch.int32, device=device) for p in params]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def adamw_fp64(state, ids, block_size, lr, beta1, beta2, eps, weight_decay, maximize):
    """Independent oracle: the textbook AdamW in float64, element by element per selected block."""
    params, grads, exp_avgs, exp_avg_sqs, steps = [[t.double().cpu().clone() for t in ts] for ts in state]
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + (p.numel() + block_size - 1) // block_size)
    for b in ids.tolist():
        t = max(i for i in range(len(params)) if offsets[i] <= b < offsets[i + 1])
        local = b - offsets[t]
        steps[t][local] += 1
        s = steps[t][local].item()
        sl = slice(local * block_size, min((local + 1) * block_size, params[t].numel()))
        p, g = params[t].view(-1)[sl], grads[t].view(-1)[sl]
        m, v = exp_avgs[t].view(-1)[sl], exp_avg_sqs[t].view(-1)[sl]
        g = -g if maximize else g
        p *= 1 - lr * weight_decay
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        p -= lr / (1 - beta1 ** s) * m / (v.sqrt() / (1 - beta2 ** s) ** 0.5 + eps)
    return params, exp_avgs, exp_avg_sqs, steps


def random_ids(num_blocks, k, device):
    return torch.sort(torch.randperm(num_blocks)[:k]).values.to(device)


def num_blocks(shapes, block_size):
    return sum((torch.Size(s).numel() + block_size - 1) // block_size for s in shapes)


HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("block_size", [1, 16, 50])
def test_matches_float64(case, param_dtype, grad_dtype, block_size):
    device, backend = case
    state = make_state(SHAPES, block_size, param_dtype, grad_dtype, device)
    n = num_blocks(SHAPES, block_size)
    ids = random_ids(n, max(1, n // 3), device)
    expected = adamw_fp64(state, ids, block_size, **HYPER)
    ops.sparse_adamw_step(*state, ids, block_size=block_size, backend=backend, **HYPER)
    atol, rtol = TOLERANCES[param_dtype]
    params, _, exp_avgs, exp_avg_sqs, steps = state
    for got, want in zip([params, exp_avgs, exp_avg_sqs], expected[:3]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double().cpu(), w, atol=atol, rtol=rtol)
    for g, w in zip(steps, expected[3]):
        assert torch.equal(g.cpu(), w.to(torch.int32))


@pytest.mark.parametrize("maximize, weight_decay, beta1", [(True, 0.0, 0.9), (False, 0.0, 0.3), (True, 0.5, 0.5)])
def test_options_match_float64(case, maximize, weight_decay, beta1):
    device, backend = case
    hyper = {**HYPER, "maximize": maximize, "weight_decay": weight_decay, "beta1": beta1}
    state = make_state(SHAPES, 8, torch.float32, torch.float32, device, max_step=40)
    ids = random_ids(num_blocks(SHAPES, 8), 20, device)
    expected = adamw_fp64(state, ids, 8, **hyper)
    ops.sparse_adamw_step(*state, ids, block_size=8, backend=backend, **hyper)
    for g, w in zip(state[0], expected[0]):
        torch.testing.assert_close(g.double().cpu(), w, atol=1e-6, rtol=1e-5)


def test_only_selected_blocks_change(case):
    device, backend = case
    block_size = 8
    state = make_state(SHAPES, block_size, torch.float32, torch.float32, device)
    n = num_blocks(SHAPES, block_size)
    ids = random_ids(n, n // 2, device)
    before = snapshot(state)
    ops.sparse_adamw_step(*state, ids, block_size=block_size, backend=backend, **HYPER)
    selected = set(ids.tolist())
    block = 0
    for t in range(len(SHAPES)):
        for local in range(before[4][t].numel()):
            sl = slice(local * block_size, (local + 1) * block_size)
            for k in range(4):  # params, grads, exp_avgs, exp_avg_sqs
                old, new = before[k][t].view(-1)[sl], state[k][t].view(-1)[sl]
                if block in selected and k != 1:
                    assert not torch.equal(old, new), f"block {block} of list {k} did not change"
                else:
                    assert_same(old, new)
            assert state[4][t][local].item() == before[4][t][local].item() + (block in selected)
            block += 1


def assert_step_matches_reference(cpu_state, ids, block_size, device, backend):
    """One step of ``backend`` on a copy of ``cpu_state`` on ``device`` against the reference on
    the CPU: fp32/fp64 tensors within an ulp or so, 16-bit ones within their dtype's tolerance."""
    state = [[t.to(device, copy=True) for t in ts] for ts in cpu_state]  # copy: on the CPU .to() is the same tensor
    ops.sparse_adamw_step(*cpu_state, ids, block_size=block_size, backend="reference", **HYPER)
    ops.sparse_adamw_step(*state, ids.to(device), block_size=block_size, backend=backend, **HYPER)
    for ref_list, got_list in zip(cpu_state, state):
        for r, g in zip(ref_list, got_list):
            atol, rtol = TOLERANCES[r.dtype] if r.dtype in (torch.bfloat16, torch.float16) else (1e-7, 1e-6)
            torch.testing.assert_close(g.cpu(), r, atol=atol, rtol=rtol)
    return state


def test_backend_matches_reference(case):
    device, backend = case
    cpu_state = make_state(SHAPES, 16, torch.float32, torch.float32, "cpu", max_step=1000)
    assert_step_matches_reference(cpu_state, random_ids(num_blocks(SHAPES, 16), 12, "cpu"), 16, device, backend)


def test_empty_selection_and_empty_lists(case):
    device, backend = case
    state = make_state(SHAPES, 16, torch.float32, torch.float32, device)
    before = snapshot(state)
    ops.sparse_adamw_step(*state, torch.empty(0, dtype=torch.int64, device=device), block_size=16,
                          backend=backend)
    assert_same(state, before)
    ops.sparse_adamw_step([], [], [], [], [], torch.empty(0, dtype=torch.int64), backend=backend)


def test_one_launch_per_dtype_group(triton_case, monkeypatch):
    device, backend = triton_case
    launches = count_launches(monkeypatch, "sparse_adamw", "launch_sparse_adamw")
    shapes = [(n,) for n in torch.randint(1, 40, (30,)).tolist()]
    state = make_state(shapes, 16, torch.float32, torch.float32, device)
    ops.sparse_adamw_step(*state, random_ids(num_blocks(shapes, 16), 10, device), block_size=16,
                          backend=backend)
    assert len(launches) == 1


def test_mixed_dtype_groups(case):
    device, backend = case
    params = [heavy_tailed((40,), torch.float32, device), heavy_tailed((33,), torch.bfloat16, device),
              heavy_tailed((20,), torch.float32, device)]
    grads = [heavy_tailed(p.shape, d, device) for p, d in zip(params, [torch.bfloat16, torch.bfloat16, torch.float32])]
    state = (params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros((p.numel() + 15) // 16, dtype=torch.int32, device=device) for p in params])
    ids = torch.tensor([0, 2, 4, 5, 6], device=device)
    expected = adamw_fp64(state, ids, 16, **HYPER)
    ops.sparse_adamw_step(*state, ids, block_size=16, backend=backend, **HYPER)
    for got, want, p in zip(state[0], expected[0], params):
        atol, rtol = TOLERANCES[p.dtype]
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)


def _bad_calls(state, ids):
    params, grads, exp_avgs, exp_avg_sqs, steps = state
    good = dict(block_size=16)
    yield "grads has 1 tensors", (params, grads[:1], exp_avgs, exp_avg_sqs, steps, ids), good
    yield r"grads\[1\] has shape", (params, [grads[0], grads[0]], exp_avgs, exp_avg_sqs, steps, ids), good
    yield r"exp_avgs\[0\] is not contiguous", (params, grads, [exp_avgs[0].view(5, 8).t(), exp_avgs[1]], exp_avg_sqs, steps, ids), dict(block_size=16)
    yield r"exp_avg_sqs\[0\] is torch.float64", (params, grads, exp_avgs, [exp_avg_sqs[0].double(), exp_avg_sqs[1]], steps, ids), good
    yield r"block_steps\[1\] must be an int32", (params, grads, exp_avgs, exp_avg_sqs, [steps[0], steps[1].long()], ids), good
    yield r"block_steps\[0\] must be a contiguous 1-D tensor of 3", (params, grads, exp_avgs, exp_avg_sqs, [steps[0][:2], steps[1]], ids), good
    yield "block_ids must be a 1-D int64", (params, grads, exp_avgs, exp_avg_sqs, steps, ids.int()), good
    yield "block_ids has 9 ids", (params, grads, exp_avgs, exp_avg_sqs, steps, torch.arange(9)), good
    yield "lr must be >= 0", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, lr=-1.0)
    yield r"beta2 must be in \[0, 1\)", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, beta2=1.0)
    yield "eps must be finite", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, eps=float("nan"))
    yield "weight_decay must be >= 0", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, weight_decay=-0.1)
    yield "maximize must be a bool", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, maximize=1)
    yield "block_size must be a positive int", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=0)
    yield "unknown backend|backend must be one of", (params, grads, exp_avgs, exp_avg_sqs, steps, ids), dict(block_size=16, backend="fast")
    yield r"grads\[0\] is a sparse tensor", (params, [grads[0].to_sparse(), grads[1]], exp_avgs, exp_avg_sqs, steps, ids), good
    yield "params must be a list", (params[0], grads, exp_avgs, exp_avg_sqs, steps, ids), good


def test_bad_inputs_change_nothing():
    state = make_state([(40,), (23,)], 16, torch.float32, torch.float32, "cpu")
    ids = torch.tensor([0, 2, 4])
    before = snapshot(state)
    for message, args, kwargs in _bad_calls(state, ids):
        with pytest.raises((TypeError, ValueError), match=message):
            ops.sparse_adamw_step(*args, **kwargs)
        assert_same(state, before)


INT64_SCRIPT = textwrap.dedent("""
    import torch
    from sparse_grad.backends import triton_kernels
    kernels = triton_kernels()
    device, block_size = {device!r}, 64
    # Each tensor is "virtual", 2**31 + 150 elements long, of which x holds the last 150: it
    # starts 2**31 elements before x, and global block 0 is local block 2**25.
    skip = 2**31
    skip_blocks = skip // block_size
    tensors = [torch.randn(150, device=device) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    tensors[3] = tensors[3].abs()
    steps = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    expected = [t.clone() for t in tensors] + [steps.clone()]
    hparams = torch.tensor([0.01, 0.9, 0.99, 1e-8, 0.1], dtype=torch.float64, device=device)
    kernels.sparse_adamw_step(*[[t] for t in expected], torch.tensor([0, 1, 2], device=device), hparams,
                              block_size, maximize=False)
    tables = [torch.tensor([-skip], device=device) for t in tensors]  # elements from each base
    tables.append(torch.tensor([steps.data_ptr() - skip_blocks * 4], device=device))
    kernels.launch_sparse_adamw(
        torch.tensor([0, 1, 2], device=device), hparams, tensors, tables,
        torch.tensor([skip + 150], device=device), torch.tensor([-skip_blocks], device=device),
        torch.zeros(3, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int64, device=device),
        3, block_size, 0, (torch.float32,) * 3, False)
    for got, want in zip(tensors + [steps], expected):
        assert torch.equal(got, want), (got, want)
    print("ok")
""")


def test_int64_offsets_past_2_31(triton_case):
    """Elements past 2**31 are addressed correctly, without allocating such a tensor."""
    device, _ = triton_case
    assert_script_prints_ok(INT64_SCRIPT.format(device=device))


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_for_16bit_params(case, param_dtype):
    """Moments in fp32 beside 16-bit params: the same result as the reference."""
    device, backend = case
    shapes = [(37,), (5, 13), (16,)]
    params, grads, _, _, steps = make_state(shapes, 8, param_dtype, param_dtype, "cpu")
    exp_avgs = [heavy_tailed(s) * 0.1 for s in shapes]
    exp_avg_sqs = [heavy_tailed(s).square() * 0.1 for s in shapes]
    cpu_state = [params, grads, exp_avgs, exp_avg_sqs, steps]
    ids = random_ids(num_blocks(shapes, 8), 9, "cpu")
    state = assert_step_matches_reference(cpu_state, ids, 8, device, backend)
    assert state[2][0].dtype == torch.float32 and state[0][0].dtype == param_dtype


def test_views_at_every_offset_and_full_versus_partial_blocks(triton_case):
    """Params, grads and moments that are views at element offsets 0..7 of larger buffers (a
    group the kernel must access element by element), beside aligned tensors (16-byte accesses
    on a GPU), match the reference; and a partial block (masked) gives the same bits as the
    same elements in a full block (unmasked)."""
    device, backend = triton_case
    block_size = 16
    shapes = [(3 * block_size + i,) for i in range(8)]
    cpu_state = make_state(shapes, block_size, torch.float32, torch.float32, "cpu", max_step=50)
    views = []
    for tensors in cpu_state[:4]:
        buffers = [torch.empty(t.numel() + 8) for t in tensors]
        views.append([b[i:i + t.numel()].copy_(t) for i, (b, t) in enumerate(zip(buffers, tensors))])
    views[3] = [v.abs_() for v in views[3]]
    aligned = make_state([(2 * block_size,), (block_size + 5,)], block_size, torch.float32, torch.float32, "cpu")
    for state in ([*views, cpu_state[4]], aligned, [a + b for a, b in zip(aligned, [*views, cpu_state[4]])]):
        blocks = num_blocks([t.shape for t in state[0]], block_size)
        ids = random_ids(blocks, blocks // 2 + 1, "cpu")
        copy = [[t.clone() for t in ts] for ts in state]
        ops.sparse_adamw_step(*copy, ids, block_size=block_size, backend="reference", **HYPER)
        on_device = [[t.to(device, copy=True) for t in ts] for ts in state]
        ops.sparse_adamw_step(*on_device, ids.to(device), block_size=block_size, backend=backend, **HYPER)
        for ref_list, got_list in zip(copy, on_device):
            for r, g in zip(ref_list, got_list):
                torch.testing.assert_close(g.cpu(), r, atol=1e-7, rtol=1e-6)

    full = make_state([(block_size,)], block_size, torch.float32, torch.float32, device)
    partial = [[t[:block_size - 1].clone() if t.dtype != torch.int32 else t.clone() for t in ts] for ts in full]
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    for state in (full, partial):
        ops.sparse_adamw_step(*state, ids, block_size=block_size, backend=backend, **HYPER)
    for f, p in zip(full[:4], partial[:4]):
        assert_same(f[0][:block_size - 1], p[0])


def test_vector_widths_follow_each_kind_of_tensor(triton_case):
    """Each kind (params, grads, moments) gets 16-byte accesses only if all of its tensors
    start on 16 bytes; a misaligned grad view costs the grads alone."""
    import importlib

    from sparse_grad.backends import triton_kernels

    module = importlib.import_module(triton_kernels().__name__ + ".sparse_adamw")
    device, _ = triton_case
    params, grads, exp_avgs, exp_avg_sqs, steps = make_state([(64,), (40,)], 16, torch.float32, torch.bfloat16,
                                                             device)
    vecs = module._step_tables(params, grads, exp_avgs, exp_avg_sqs, steps, 16, False)[-1]
    assert vecs == [(4, 8, 4)]
    shifted = [torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:] for t in grads]
    vecs = module._step_tables(params, shifted, exp_avgs, exp_avg_sqs, steps, 16, False)[-1]
    assert vecs == [(4, 1, 4)]
    vecs = module._step_tables(params, grads, exp_avgs, exp_avg_sqs, steps, 6, False)[-1]
    assert vecs == [(1, 1, 1)]  # a block of 6 elements: every other block starts 8 bytes in
    slab = torch.zeros(3, 16, device=device)
    vecs = module._step_tables(params, grads, [slab], [slab.clone()], [steps[0][:3]], 16, True)[-1]
    assert vecs == [(4, 8, 4)]


def grad_slab(grads, ids, block_size, dtype):
    """The compact grad of ``grads`` for ``ids``: row i the block ids[i] (partial blocks padded
    with a value the kernels must not read)."""
    padded = [torch.cat([g.reshape(-1).to(dtype), torch.full((-g.numel() % block_size,), float("nan"), dtype=dtype,
                                                             device=g.device)]) for g in grads]
    return torch.cat(padded).view(-1, block_size)[ids].clone()


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
    (torch.float64, torch.float64)], ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 50])
@pytest.mark.parametrize("compact", [False, True], ids=["dense-state", "compact-state"])
def test_compact_grads_update_as_the_dense_grads(case, param_dtype, grad_dtype, block_size, compact):
    """compact_grads=True reads row i of one slab for block ids[i]: the same update, bit for bit,
    as the dense grads (the tails of partial blocks hold NaN: a kernel reading past a block's
    end would show it)."""
    device, backend = case
    torch.manual_seed(block_size)
    shapes = SHAPES
    n = num_blocks(shapes, block_size)
    ids = random_ids(n, max(1, n // 3), device)
    state = make_state(shapes, block_size, param_dtype, grad_dtype, device)
    slab = grad_slab(state[1], ids, block_size, grad_dtype)
    results = []
    for compact_grads in (False, True):
        params, grads, exp_avgs, exp_avg_sqs, steps = [[t.clone() for t in ts] for ts in state]
        if compact:  # the selected blocks' moments and counts as slabs, rows in id order
            exp_avgs, exp_avg_sqs = ([grad_slab(m, ids, block_size, m[0].dtype).nan_to_num()]
                                     for m in (exp_avgs, exp_avg_sqs))
            steps = [torch.cat(steps)[ids].clone()]
        ops.sparse_adamw_step(params, [slab] if compact_grads else grads, exp_avgs, exp_avg_sqs, steps, ids,
                              block_size=block_size, backend=backend, compact=compact, compact_grads=compact_grads,
                              **HYPER)
        results.append((params, exp_avgs, exp_avg_sqs, steps))
    assert_same(results[1], results[0])


def test_bad_compact_grads_change_nothing(case):
    device, backend = case
    state = make_state([(40,), (23,)], 16, torch.float32, torch.float32, device)
    ids = torch.tensor([0, 2, 4], device=device)
    before = snapshot(state)
    params, grads, *moments = state
    for message, bad in [("exactly one tensor", grads), ("block_size elements per block id", [grads[0][:32]]),
                         ("dtype", [torch.zeros(3, 16, dtype=torch.int32, device=device)])]:
        with pytest.raises((TypeError, ValueError), match=message):
            ops.sparse_adamw_step(params, bad, *moments, ids, block_size=16, backend=backend, compact_grads=True)
        assert_same(state, before)
    with pytest.raises(TypeError, match="compact_grads"):
        ops.sparse_adamw_step(params, grads, *moments, ids, block_size=16, backend=backend, compact_grads="yes")
    assert_same(state, before)
