"""GradientMonitor: accumulation from SparseAdamW's hook or one ops call per update, dumps,
plots, and the heavy-tail report of a real small model."""
import pytest
import torch
from _models import no_host_sync, odd_model, one_thread, set_grads, tiny_lm
from _utils import assert_same

from sparse_grad import SparseAdamW, ops
from sparse_grad.analysis import GradientMonitor, GradientSnapshot
from sparse_grad.demo import TinyLM, stdlib_bytes, train_steps

SKIPS = [(), ("2.bias",), ("0.weight", "3.bias"), ()]  # params without a grad, step by step


def scores_of(model, block_size):
    return {n: ops.block_sqnorms([p.grad], block_size) if p.grad is not None else None
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulate", ["mean", "ema"])
def test_accumulation_matches_a_direct_computation_per_block(accumulate):
    model = odd_model()
    monitor = GradientMonitor(model, block_size=16, accumulate=accumulate, beta=0.8)
    seen = {n: [] for n, _ in model.named_parameters()}
    for skip in SKIPS:
        set_grads(model, skip)
        for n, s in scores_of(model, 16).items():
            if s is not None:
                seen[n].append(s)
        monitor.update()
    assert monitor.steps == len(SKIPS)
    for name, got in monitor.scores().items():
        history = torch.stack(seen[name]).double()
        if accumulate == "mean":
            expected = history.mean(0)
        else:  # bias-corrected EMA over the steps the block had a gradient
            ema = torch.zeros_like(history[0])
            for s in history:
                ema = 0.8 * ema + 0.2 * s
            expected = ema / (1 - 0.8 ** len(history))
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    snap = monitor.snapshot()
    assert snap.history.shape == (len(SKIPS), 6)
    for row, skip in zip(snap.history, SKIPS):
        for t, (name, p) in enumerate(model.named_parameters()):
            assert (row[t] == 0) == (name in skip)


def test_non_finite_scores_are_not_observations():
    model = odd_model()
    monitor = GradientMonitor(model, block_size=16)
    set_grads(model)
    first = {n: s.clone() for n, s in scores_of(model, 16).items()}
    monitor.update()
    model[0].weight.grad[0, 0] = float("inf")  # block 0 of 0.weight overflows
    model[2].weight.grad[1, 3] = float("nan")  # so does block 2 of 2.weight
    monitor.update()
    second = scores_of(model, 16)
    got = monitor.scores()
    for name, blocks in (("0.weight", [0]), ("2.weight", [2])):
        torch.testing.assert_close(got[name][blocks], first[name][blocks])  # only the first step counts
        rest = torch.ones_like(got[name], dtype=torch.bool)
        rest[blocks] = False
        torch.testing.assert_close(got[name][rest], ((first[name] + second[name]) / 2)[rest])
    assert bool(torch.isfinite(monitor.snapshot().history).all())


def test_hook_and_update_record_the_same(case):
    device, backend = case
    model = odd_model(device)
    opt = SparseAdamW(model.parameters(), density=0.4, block_size=8, reselect_every=2, backend=backend)
    hooked = GradientMonitor(model, block_size=8, history_every=2)
    updated = GradientMonitor(model, block_size=8, history_every=2)
    hooked.attach(opt)
    for skip in SKIPS:
        set_grads(model, skip)
        updated.update()
        opt.step()
    a, b = hooked.snapshot(), updated.snapshot()
    assert a.steps == b.steps == 4 and a.history.shape == (2, 6)
    for name in a.names:
        torch.testing.assert_close(a.scores[name], b.scores[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(a.history, b.history, rtol=1e-6, atol=0)


def test_update_is_one_multi_tensor_launch(monkeypatch):
    calls = []
    real = ops.unchecked.block_sqnorms
    monkeypatch.setattr(ops.unchecked, "block_sqnorms",
                        lambda tensors, *a, **k: (calls.append(len(tensors)), real(tensors, *a, **k))[1])
    model = odd_model()
    monitor = GradientMonitor(model, block_size=32)
    set_grads(model, skip=("2.bias",))
    monitor.update()
    assert calls == [5]
    for p in model.parameters():
        p.grad = None
    monitor.update()  # no grads: nothing to record
    assert calls == [5] and monitor.steps == 1


def test_several_groups_count_as_one_step_each():
    model = odd_model()
    params = list(model.parameters())
    opt = SparseAdamW([{"params": params[:3]}, {"params": params[3:]}], density=0.5, block_size=4)
    monitor = GradientMonitor(model, block_size=4)
    monitor.attach(opt)
    for _ in range(3):
        set_grads(model)
        opt.step()
    snap = monitor.snapshot()
    assert snap.steps == 3 and snap.history.shape == (3, 6) and bool((snap.history > 0).all())


def test_dump_round_trip_and_report(tmp_path):
    model = odd_model()
    monitor = GradientMonitor(model, block_size=8, accumulate="ema")
    for skip in SKIPS:
        set_grads(model, skip)
        monitor.update()
    snap = monitor.snapshot()
    snap.extra["note"] = "kept"
    snap.save(tmp_path / "dump.safetensors")
    back = GradientSnapshot.load(tmp_path / "dump.safetensors")
    assert (back.names, back.shapes, back.dtypes, back.steps, back.accumulate, back.extra) == \
        (snap.names, snap.shapes, snap.dtypes, 4, "ema(beta=0.9)", {"note": "kept"})
    assert_same(back.scores, snap.scores)
    assert_same(back.history, snap.history)
    assert back.report().as_dict() == monitor.report().as_dict()
    modules, shares = back.module_history()
    assert modules == ["0", "2", "3"] and shares.shape == (3, 4)
    assert shares.sum(0) == pytest.approx([1.0] * 4)


def test_plots_are_png_files(tmp_path):
    from sparse_grad.analysis.plots import save_heavy_tail_figure, save_module_heatmap

    model = tiny_lm()
    monitor = GradientMonitor(model, block_size=32)
    for _ in range(3):
        set_grads(model)
        monitor.update()
    snap = monitor.snapshot()
    for path in (save_heavy_tail_figure(snap, snap.report(), tmp_path / "a.png"),
                 save_module_heatmap(snap, tmp_path / "b.png", depth=3)):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_real_model_gradient_mass_is_concentrated():
    """A byte-level transformer trained a few dozen steps on the standard library's source: the
    top 20% of its blocks hold far more than 20% of the gradient mass."""
    model = TinyLM(32, width=64, layers=2, heads=4)  # 1,064 blocks of 128 elements
    monitor = GradientMonitor(model, block_size=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # a dense first stage, any optimizer
    with one_thread():
        losses = train_steps(model, opt, stdlib_bytes(200_000), steps=40, batch=16, context=32,
                             after_backward=monitor.update)
    assert losses[-1] < losses[0]
    report = monitor.report()
    assert report.overall.top_shares[0.2] > 0.6  # measured 0.91-0.93 over seeds
    assert report.overall.gini > 0.6
    assert report.overall.power_law is not None


def test_bad_arguments_and_mismatches():
    model = odd_model()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GradientMonitor(list(model.parameters()))
    with pytest.raises(ValueError, match="accumulate"):
        GradientMonitor(model, accumulate="median")
    with pytest.raises(ValueError, match="beta"):
        GradientMonitor(model, accumulate="ema", beta=1.0)
    with pytest.raises(ValueError, match="history_every"):
        GradientMonitor(model, history_every=0)
    with pytest.raises(TypeError, match="block_size"):
        GradientMonitor(model, block_size=8.0)
    frozen = odd_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        GradientMonitor(frozen)
    monitor = GradientMonitor(model, block_size=8)
    with pytest.raises(TypeError, match="register_score_hook"):
        monitor.attach(torch.optim.AdamW(model.parameters()))
    opt = SparseAdamW(model.parameters(), block_size=16)
    with pytest.raises(ValueError, match=r"param_groups\[0\] uses block_size 16, the monitor 8"):
        monitor.attach(opt)
    opt = SparseAdamW(model.parameters(), block_size=8)
    monitor.attach(opt)
    opt.param_groups[0]["block_size"] = 16  # changed after attaching
    set_grads(model)
    with pytest.raises(ValueError, match=r"param_groups\[0\] uses block_size 16, the monitor 8"):
        opt.step()
    transposed = odd_model()
    transposed[2].weight.data = transposed[2].weight.data.t()
    with pytest.raises(ValueError, match="model parameter '2.weight': params.2. is not contiguous"):
        GradientMonitor(transposed)
    other = odd_model()
    opt = SparseAdamW([*model.parameters(), *other.parameters()], block_size=8)
    GradientMonitor(model, block_size=8).attach(opt)
    set_grads(other)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[6\] \(shape \(37, 13\)\) is not a trainable"):
        opt.step()
    model[0].weight.grad = model[0].weight.grad.to_sparse()
    with pytest.raises(TypeError, match="grad of 0.weight is sparse"):
        GradientMonitor(model, block_size=8).update()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_per_step_on_cuda():
    model = odd_model("cuda")
    opt = SparseAdamW(model.parameters(), density=0.3, block_size=8)
    hooked, updated = GradientMonitor(model, block_size=8), GradientMonitor(model, block_size=8)
    hooked.attach(opt)
    set_grads(model)
    updated.update()
    opt.step()  # first steps build cached index maps and state
    with no_host_sync():
        for _ in range(3):
            set_grads(model)
            updated.update()
            opt.step()
    assert hooked.steps == updated.steps == 4
