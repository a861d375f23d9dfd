"""SparseAdamW.step on CUDA tensors: no host sync, and capturable in a CUDA graph (docs/design.md §3).

Skipped without a GPU: the CPU suite cannot see a host sync or a graph capture.
"""
import pytest
import torch

from sparse_grad import SparseAdamW
from _utils import backend_cases, heavy_tailed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The fast paths. The reference backend is the oracle, written for clarity: it reads ids and
# hyper-parameters on the host, so it syncs and cannot be captured.
CUDA_BACKENDS = [b for d, b in backend_cases() if d == "cuda" and b != "reference"]
OPTIONS = [
    dict(),
    dict(score="rms", score_ema=0.9, min_blocks_per_tensor=1, scope="tensor"),
    dict(error_feedback=True, max_grad_norm=1.0),
    dict(state_layout="compact", state_dtype=torch.float32, max_grad_norm=1.0),
    dict(tensor_lr=True, betas=(0.9, 0.99)),  # lr: a CUDA tensor (made in the test)
]


def optimizer_kwargs(options):
    options = dict(options)
    lr = torch.tensor(1e-2, device="cuda") if options.pop("tensor_lr", False) else 1e-2
    return dict(lr=lr, density=0.05, block_size=256, **options)


def model_params(dtype=torch.float32):
    torch.manual_seed(0)
    shapes = [(300, 77), (77,), (1000,), (3, 5, 7)]
    return [torch.nn.Parameter(heavy_tailed(s, dtype, "cuda")) for s in shapes]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # in place: a captured graph reads these very tensors


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_step_makes_no_host_sync(backend, options):
    params = model_params()
    opt = SparseAdamW(params, backend=backend, **optimizer_kwargs(options))
    for _ in range(2):  # first steps allocate state and cache tables
        set_grads(params, [heavy_tailed(p.shape, device="cuda") for p in params])
        opt.step()
    torch.cuda.synchronize()
    set_grads(params, [heavy_tailed(p.shape, device="cuda") for p in params])
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_step_captured_in_a_cuda_graph_matches_eager(backend, options):
    grads = [[heavy_tailed(p.shape, device="cuda") for p in model_params()] for _ in range(13)]
    eager_params, graph_params = model_params(), model_params()
    eager = SparseAdamW(eager_params, backend=backend, **optimizer_kwargs(options))
    graphed = SparseAdamW(graph_params, backend=backend, **optimizer_kwargs(options))
    for step_grads in grads:
        set_grads(eager_params, step_grads)
        eager.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: state, caches, Triton compilation
        for step_grads in grads[:2]:
            set_grads(graph_params, step_grads)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    set_grads(graph_params, grads[2])
    with torch.cuda.graph(graph):
        graphed.step()  # capture records the kernels; the captured step itself runs at replay
    for step_grads in grads[2:12]:  # replay 10 times, new grads copied into the captured ones
        set_grads(graph_params, step_grads)
        graph.replay()
    set_grads(graph_params, grads[12])
    graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(graph_params, eager_params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
