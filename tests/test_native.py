"""The native backends' extension (sparse_grad._C): built, registered, identical results on every
instruction set and thread count, C++-side checks. Numerics against the reference run in the
shared suites (the `case` fixture includes cpp/cuda wherever they are built)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sparse_grad import backends, ops
from sparse_grad.backends import native
from _utils import assert_same, heavy_tailed, snapshot

CPU = torch.device("cpu")
cpp_built = pytest.mark.skipif(backends.unavailable_reason("cpp", CPU) is not None,
                               reason=str(backends.unavailable_reason("cpp", CPU)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def test_built_wherever_a_compiler_exists():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here: the install is pure Python")
    assert backends.unavailable_reason("cpp", CPU) is None
    assert backends.resolve("auto", CPU) == "cpp"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparse_grad::native_sparse_adamw_step", "CPU")


def test_unavailable_backends_say_why(monkeypatch):
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu: .*runs on cuda tensors"):
        ops.block_sqnorms([torch.randn(4)], 4, backend="cuda")
    monkeypatch.setattr(native, "_load_error", lambda: "the extension sparse_grad._C is not available (x)")
    monkeypatch.setattr(native, "_REASONS", {})  # the answer is cached per backend
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run on cpu: the extension sparse_grad._C is not"):
        ops.block_sqnorms([torch.randn(4)], 4, backend="cpp")
    assert backends.resolve("auto", CPU) == "reference"


def step_state(dtypes, block_size, num_blocks_hint=5):
    shapes = [(block_size * num_blocks_hint + 3,), (block_size // 2 + 1,), (0,), (2, block_size + 7)]
    out = []
    for shape, dtype in zip(shapes, dtypes):
        p = heavy_tailed(shape, dtype)
        out.append((p, heavy_tailed(shape, dtype), heavy_tailed(shape, dtype) * 0.1,
                    heavy_tailed(shape, dtype).square() * 0.1,
                    torch.randint(0, 50, ((p.numel() + block_size - 1) // block_size,), dtype=torch.int32)))
    return [list(x) for x in zip(*out)]


@cpp_built
def test_opcheck_native_schemas():
    tensors = [heavy_tailed(s, d) for s, d in zip([(37,), (4, 5), (1,)], [torch.float32, torch.bfloat16, torch.float64])]
    torch.library.opcheck(torch.ops.sparse_grad.native_block_sqnorms.default, (tensors, 8))
    scores = torch.rand(30)
    torch.library.opcheck(torch.ops.sparse_grad.native_select_blocks.default, (scores, [10, 0, 20], [3, 0, 20]))
    state = step_state([torch.float32] * 4, 8)
    ids = torch.tensor([0, 3, 7, 9])
    hyper = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01], dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparse_grad.native_sparse_adamw_step.default, (*state, ids, hyper, 8, False))
    extras = (torch.full((1,), 0.5), torch.zeros(1), False)
    torch.library.opcheck(torch.ops.sparse_grad.native_sparse_adamw_step.default,
                          (*step_state([torch.float32] * 4, 8), ids, hyper, 8, False, *extras))
    params, _, *moments = step_state([torch.float32] * 4, 8)
    torch.library.opcheck(torch.ops.sparse_grad.native_sparse_adamw_step.default,
                          (params, [heavy_tailed((4, 8))], *moments, ids, hyper, 8, False, None, None, False, True))


def test_public_and_native_update_schemas_agree():
    """The native schema is the public op's, less the backend name (sparse_grad/library.py)."""
    public = torch.ops.sparse_grad.sparse_adamw_step.default._schema.arguments
    native_args = torch.ops.sparse_grad.native_sparse_adamw_step.default._schema.arguments
    strip = lambda args: [(a.name, str(a.type)) for a in args if a.name != "backend"]  # noqa: E731
    assert strip(public) == strip(native_args)


RUN_SCRIPT = """
import sys, torch
from sparse_grad import ops
torch.manual_seed(1234)
torch.set_num_threads(int(sys.argv[2]))
results = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for block_size in (1, 7, 64, 1000):
        xs = [torch.randn(n, dtype=dtype) * torch.rand(()) * 10 for n in (3 * block_size + 5, 1, 0, 4000)]
        results.append(ops.block_sqnorms(xs, block_size, backend="cpp"))
        state = [xs, [torch.randn_like(x) for x in xs], [torch.randn_like(x) for x in xs],
                 [torch.rand_like(x) for x in xs],
                 [torch.randint(0, 9, ((x.numel() + block_size - 1) // block_size,), dtype=torch.int32) for x in xs]]
        n = sum(s.numel() for s in state[4])
        ids = torch.sort(torch.randperm(n)[: n // 2 + 1]).values
        ops.sparse_adamw_step(*state, ids, block_size=block_size, lr=0.01, weight_decay=0.1, backend="cpp")
        results.append(state)
torch.save(results, sys.argv[1])
"""


def run_cpp(tmp_path, isa, threads):
    out = tmp_path / f"{isa}-{threads}.pt"
    env = {**os.environ, "SPARSE_GRAD_CPU_ISA": isa}
    run = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(out), str(threads)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@cpp_built
def test_every_instruction_set_and_thread_count_gives_the_same_bits(tmp_path):
    isas = {"avx512": ["default", "avx2", "avx512"], "avx2": ["default", "avx2"]}.get(native.cpu_isa(), ["default"])
    expected = run_cpp(tmp_path, isas[0], 1)
    for isa in isas:
        for threads in (1, 2):
            if (isa, threads) != (isas[0], 1):
                assert_same(run_cpp(tmp_path, isa, threads), expected)


@cpp_built
def test_unknown_instruction_set_is_an_error(tmp_path):
    env = {**os.environ, "SPARSE_GRAD_CPU_ISA": "sse9"}
    run = subprocess.run([sys.executable, "-c", "import torch; from sparse_grad import ops; "
                          "ops.block_sqnorms([torch.ones(3)], 2, backend='cpp')"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "SPARSE_GRAD_CPU_ISA=sse9 is not available" in run.stderr


def _bad_native_calls(state, ids):
    params, grads, exp_avgs, exp_avg_sqs, steps = state
    table = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01], dtype=torch.float64)
    hyper = (table, 8, False)
    yield "block_size must be positive", (*state, ids, table, 0, False)
    yield "grads has 3 tensors, expected 4", (params, grads[:3], exp_avgs, exp_avg_sqs, steps, ids, *hyper)
    yield "block_ids must be a contiguous 1-D int64", (*state, ids.int(), *hyper)
    yield r"block_steps\[1\] must be int32", (params, grads, exp_avgs, exp_avg_sqs, [steps[0], steps[1].long(), *steps[2:]], ids, *hyper)
    yield r"exp_avgs\[0\] is Half; the state dtype", (params, grads, [exp_avgs[0].half(), *exp_avgs[1:]], [exp_avg_sqs[0].half(), *exp_avg_sqs[1:]], steps, ids, *hyper)
    yield r"params\[3\] is not contiguous", ([*params[:3], params[3].t()], grads, exp_avgs, exp_avg_sqs, steps, ids, *hyper)
    yield "hyper must be a contiguous float64 CPU tensor of 5 values", (*state, ids, table.float(), 8, False)
    yield "hyper must be a contiguous float64 CPU tensor of 5 values", (*state, ids, table[:4], 8, False)


@cpp_built
def test_native_kernel_rejects_bad_input_before_writing():
    state = step_state([torch.float32] * 4, 8)
    ids = torch.tensor([0, 2, 5])
    before = snapshot(state)
    for message, args in _bad_native_calls(state, ids):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparse_grad.native_sparse_adamw_step(*args)
        assert_same(state, before)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has unsupported dtype"):
        torch.ops.sparse_grad.native_block_sqnorms([torch.ones(3), torch.ones(3, dtype=torch.int32)], 2)


@cpp_built
def test_out_of_range_ids_touch_nothing():
    state = step_state([torch.float32] * 4, 8)
    n = sum(s.numel() for s in state[4])
    before = snapshot(state)
    torch.ops.sparse_grad.native_sparse_adamw_step(
        *state, torch.tensor([-1, n, n + 100]), torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01], dtype=torch.float64),
        8, False)
    assert_same(state, before)


@cpp_built
def test_native_selection_matches_the_topk_keys_at_scale():
    """10^5 blocks with heavy ties, globally and in 300 segments: the same ids as torch.topk."""
    from sparse_grad.backends import topk_select
    scores = torch.randn(100_003).square()
    scores[::5] = scores[7]
    scores[::97] = float("nan")
    sizes = torch.multinomial(torch.ones(300), 300, replacement=True).tolist()
    sizes = [n * 100_003 // sum(sizes) for n in sizes]
    sizes[-1] += 100_003 - sum(sizes)
    for segment_sizes, ks in (([100_003], [5_001]), (sizes, [(n + 19) // 20 for n in sizes])):
        got = torch.ops.sparse_grad.native_select_blocks(scores, segment_sizes, ks)
        assert torch.equal(got, topk_select.select_blocks(scores, segment_sizes, ks))


@cpp_built
def test_native_selection_rejects_bad_input():
    scores = torch.rand(10)
    with pytest.raises(RuntimeError, match="segments cover 9 blocks"):
        torch.ops.sparse_grad.native_select_blocks(scores, [4, 5], [1, 1])
    with pytest.raises(RuntimeError, match=r"segment_ks\[1\] must be in \[0, 6\]"):
        torch.ops.sparse_grad.native_select_blocks(scores, [4, 6], [1, 7])
    with pytest.raises(RuntimeError, match="contiguous 1-D float32"):
        torch.ops.sparse_grad.native_select_blocks(scores.double(), [10], [1])
