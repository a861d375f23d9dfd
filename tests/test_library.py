"""The torch.library custom ops: schemas, fake impls, opcheck, torch.compile, backend choice."""
import pytest
import torch

import sparse_grad  # noqa: F401  (registers torch.ops.sparse_grad)
from sparse_grad import backends, ops
from _utils import heavy_tailed


def step_args(device, backend):
    params = [heavy_tailed(s, device=device) for s in [(37,), (4, 5), (1,)]]
    return (params, [heavy_tailed(p.shape, device=device) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((p.numel() + 7) // 8, dtype=torch.int32, device=device) for p in params],
            torch.tensor([0, 2, 5, 8], device=device),
            torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01], dtype=torch.float64, device=device), 8, False, backend)


def test_opcheck(case):
    device, backend = case
    tensors = [heavy_tailed(s, device=device) for s in [(37,), (4, 5), (1,)]]
    torch.library.opcheck(torch.ops.sparse_grad.block_sqnorms.default, (tensors, 8, backend))
    scores = torch.rand(30, device=device)
    torch.library.opcheck(torch.ops.sparse_grad.select_blocks.default, (scores, [30], [7], backend))
    torch.library.opcheck(torch.ops.sparse_grad.select_blocks.default, (scores, [10, 20], [3, 2], backend))
    torch.library.opcheck(torch.ops.sparse_grad.sparse_adamw_step.default, step_args(device, backend))
    # the optional device scalars and compact state
    fused = (torch.full((1,), 0.5, device=device), torch.zeros(1, device=device), False)
    torch.library.opcheck(torch.ops.sparse_grad.sparse_adamw_step.default, (*step_args(device, backend), *fused))
    params, grads, *_, ids = step_args(device, backend)[:6]
    slabs = ([torch.zeros(4, 8, device=device)], [torch.zeros(4, 8, device=device)],
             [torch.zeros(4, dtype=torch.int32, device=device)])
    compact = (params, grads, *slabs, ids, *step_args(device, backend)[6:], None, None, True)  # noqa: E501
    torch.library.opcheck(torch.ops.sparse_grad.sparse_adamw_step.default, compact)
    # compact grads: one slab [len(ids), block_size], with dense and with compact state
    grad_slab = [heavy_tailed((4, 8), device=device)]
    for state_compact in (False, True):
        state = slabs if state_compact else step_args(device, backend)[2:5]
        args = (params, grad_slab, *state, ids, *step_args(device, backend)[6:], None, None, state_compact, True)
        torch.library.opcheck(torch.ops.sparse_grad.sparse_adamw_step.default, args)


def test_compiled_step_matches_eager():
    """The three ops trace into one graph (fullgraph=True) and give the eager results."""

    def sparse_step(params, grads, exp_avgs, exp_avg_sqs, block_steps):
        scores = ops.block_sqnorms(grads, 8, backend="reference")
        ids = ops.select_blocks(scores, density=0.3, backend="reference")
        ops.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, ids, block_size=8,
                              lr=1e-2, backend="reference")
        return scores

    args = step_args("cpu", "reference")[:5]
    eager_args = [[t.clone() for t in ts] for ts in args]
    compiled = torch.compile(sparse_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        torch.testing.assert_close(compiled(*args), sparse_step(*eager_args), rtol=0, atol=0)
    for got, want in zip(args, eager_args):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_auto_backend():
    cpp_built = backends.unavailable_reason("cpp", torch.device("cpu")) is None
    assert backends.resolve("auto", torch.device("cpu")) == ("cpp" if cpp_built else "reference")
    assert backends.resolve("reference", torch.device("cpu")) == "reference"
    assert backends.resolve("auto", None) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("cuda-graph", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.block_sqnorms([torch.randn(4)], 4, backend="triton")


def test_kernels_import_as_subpackage():
    kernels = backends.triton_kernels()
    assert kernels.__name__ == "sparse_grad.triton_kernels"
    assert callable(kernels.block_sqnorms) and callable(kernels.sparse_adamw_step)


@pytest.fixture(params=["extension", "torch"])
def version_bump(request, monkeypatch):
    """How an eager step bumps versions: the extension's ``bump_versions`` or torch's own call."""
    from sparse_grad.backends import native
    bump = native.extension_function("bump_versions")
    if request.param == "extension" and bump is None:
        pytest.skip("sparse_grad._C is not built")
    real = native.extension_function
    monkeypatch.setattr(native, "extension_function",
                        lambda name: (bump if request.param == "extension" else None) if name == "bump_versions"
                        else real(name))
    return request.param


def test_eager_step_bumps_the_versions_of_what_it_mutates(case, version_bump):
    """Eager calls skip the custom-op wrapper but, like it, tell autograd of the in-place change."""
    device, backend = case
    args = step_args(device, backend)
    mutated = [t for i in (0, 2, 3, 4) for t in args[i]]
    versions = [t._version for t in mutated]
    ops.unchecked.sparse_adamw_step(*args)
    assert all(t._version > v for t, v in zip(mutated, versions))
    assert all(g._version == 0 for g in args[1])


def test_bump_versions_does_what_torch_does(version_bump):
    """One bump per listed tensor (a view shares its base's counter, so both count), inference
    tensors skipped; so autograd refuses a backward through a value the step overwrote."""
    from sparse_grad._unchecked import bump_versions
    with torch.inference_mode():
        frozen = torch.randn(3)
    base = torch.randn(6)
    view, other = base[2:], torch.randn(2, 3)
    before = (base._version, other._version)
    bump_versions([base, frozen, view, other])
    assert (base._version, other._version) == (before[0] + 2, before[1] + 1) and view._version == base._version
    weight = torch.nn.Parameter(torch.randn(4))
    loss = (weight * weight).sum()  # saves weight for backward
    bump_versions([weight])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_extension_checks_every_element_before_bumping_any():
    from sparse_grad.backends import native
    bump = native.extension_function("bump_versions")
    if bump is None:
        pytest.skip("sparse_grad._C is not built")
    tensor = torch.randn(3)
    with pytest.raises(TypeError, match="element 1 is a int, not a tensor"):
        bump([tensor, 3])
    assert tensor._version == 0
    with pytest.raises(TypeError, match="list of tensors"):
        bump((tensor,))
