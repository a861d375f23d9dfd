"""Compute per resource: the resource meter (real readings or 'unavailable') and the
marginal-return stopping rule on synthetic curves."""
import math

import numpy as np
import pytest
import torch
from _models import odd_model, set_grads

import sparse_grad.cpr.meter as meter_module
from sparse_grad import SparseAdamW
from sparse_grad.cpr import MarginalReturnStopper, ResourceMeter, energy

GIB = 2**30

# -- MarginalReturnStopper ----------------------------------------------------------------------


def first_stop(stopper, gammas, psis):
    for i, (g, p) in enumerate(zip(gammas, psis)):
        if stopper.update(p, g):
            return i
    return None


@pytest.mark.parametrize("window, patience", [(5, 3), (1, 1), (10, 2)])
def test_stops_on_a_saturating_curve_where_the_marginal_return_crosses_eta(window, patience):
    """Ψ = 1 − exp(−Γ): dΨ/dΓ = exp(−Γ) falls below η at Γc = ln(1/η). A windowed secant is the
    slope somewhere inside its window, so the stop lies in [Γc, Γc + (window + patience)·h]."""
    eta, h = 0.05, 0.1
    gammas = h * np.arange(1, 200)
    stopper = MarginalReturnStopper(window=window, eta=eta, patience=patience)
    i = first_stop(stopper, gammas, 1 - np.exp(-gammas))
    crossing = math.log(1 / eta)
    assert crossing <= gammas[i] <= crossing + (window + patience) * h
    assert stopper.stopped_at == i and stopper.should_stop
    assert stopper.update(1.0, gammas[-1] + 1)  # stays stopped
    assert all(r >= eta for r in stopper.returns[:i - window - patience + 1])


def test_noisy_and_unevenly_spaced_saturating_curve():
    g = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    eta = 0.05
    gammas = np.cumsum(g.uniform(0.05, 0.15, 400))
    psis = 1 - np.exp(-gammas) + g.normal(0, 0.002, gammas.size)
    i = first_stop(MarginalReturnStopper(window=10, eta=eta, patience=3), gammas, psis)
    crossing = math.log(1 / eta)
    assert crossing - 0.4 <= gammas[i] <= crossing + 13 * 0.15 + 0.4


def test_never_stops_on_a_linear_curve_above_eta_and_stops_at_once_below_it():
    g = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    gammas = np.cumsum(g.uniform(0.5, 1.5, 2000))
    assert first_stop(MarginalReturnStopper(window=5, eta=0.1, patience=3), gammas,
                      0.5 * gammas + g.normal(0, 0.01, gammas.size)) is None
    stopper = MarginalReturnStopper(window=5, eta=0.1, patience=3)
    assert first_stop(stopper, gammas, 0.01 * gammas) == 5 + 3 - 1  # the first full window, then patience
    assert stopper.returns[0] == pytest.approx(0.01)


def test_stopper_rejects_bad_input_and_keeps_its_state():
    for kwargs, error, message in [
        ({"window": 0}, ValueError, "window"), ({"window": 1.5}, TypeError, "window"),
        ({"patience": 0}, ValueError, "patience"), ({"eta": math.nan}, ValueError, "eta"),
        ({"eta": "0.1"}, TypeError, "eta"), ({"eta": True}, TypeError, "eta"),
    ]:
        with pytest.raises(error, match=message):
            MarginalReturnStopper(**kwargs)
    stopper = MarginalReturnStopper(window=2, eta=-1.0)  # a negative η: stop only when Ψ falls fast
    stopper.update(0.0, 1.0)
    with pytest.raises(ValueError, match="gamma must increase"):
        stopper.update(1.0, 1.0)
    with pytest.raises(ValueError, match="psi must be finite"):
        stopper.update(math.inf, 2.0)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        stopper.update(1.0, "2")
    assert stopper.psi == [0.0] and stopper.gamma == [1.0]


# -- ResourceMeter ------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def rss(monkeypatch):
    """The process's resident memory, as the test sets it."""
    memory = {"bytes": 2 * GIB}
    monkeypatch.setattr(meter_module, "_process_rss_bytes", lambda: (memory["bytes"], "test RSS"))
    return memory


def test_device_hours_and_memory_time_integrate_over_samples(tmp_path, rss):
    clock = Clock()
    with ResourceMeter(clock=clock, powercap_root=tmp_path) as meter:
        clock.now += 1800
        meter.sample()  # 2 GiB for half an hour
        rss["bytes"] = 4 * GIB
        clock.now += 900  # 4 GiB for a quarter of an hour
    report = meter.report()
    assert report.elapsed_s == 2700 and report.device_hours == pytest.approx(0.75)
    assert report.memory_gib_hours == pytest.approx(2 * 0.5 + 4 * 0.25)
    assert report.peak_memory_gib == 4 and report.samples == 2 and report.memory_source == "test RSS"
    assert meter.gamma("device_hours") == pytest.approx(0.75)  # stopped: totals stay
    assert report.state_gib_hours is None
    with pytest.raises(ValueError, match="state_gib_hours needs an optimizer"):
        meter.gamma("state_gib_hours")


def test_attached_optimizer_samples_every_step_and_tracks_its_state(tmp_path, rss):
    clock = Clock()
    model = odd_model()
    opt = SparseAdamW(model.parameters(), density=0.5, block_size=8)
    meter = ResourceMeter(clock=clock, powercap_root=tmp_path).start()
    handle = meter.attach(opt)
    for _ in range(3):
        set_grads(model)
        clock.now += 36
        opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    # Post-step hooks sample after each step, when its state exists: 3 intervals of 0.01 h.
    assert meter.gamma("state_gib_hours") == pytest.approx(3 * state_bytes / GIB * 0.01)
    assert meter.report().samples == 3 + 2  # and gamma() and report() sample too
    handle.remove()
    set_grads(model)
    opt.step()
    assert meter.report().samples == 6


def test_compact_state_counts_its_moment_slabs(tmp_path, rss):
    """SparseAdamW's compact layout keeps its moments outside optimizer.state: they count too,
    and come to about density x the dense layout's moments."""
    sizes = {}
    for layout in ("dense", "compact"):
        torch.manual_seed(0)
        model = odd_model()
        opt = SparseAdamW(model.parameters(), density=0.25, block_size=8, state_layout=layout)
        set_grads(model)
        opt.step()
        sizes[layout] = meter_module.optimizer_state_bytes(opt)
    moments = 2 * 4 * sum(p.numel() for p in odd_model().parameters())
    assert sizes["dense"] > moments
    assert 0.2 * moments < sizes["compact"] < 0.5 * moments


def fake_rapl(root, zones):
    for name, (value, limit) in zones.items():
        (root / name).mkdir(parents=True)
        (root / name / "energy_uj").write_text(f"{value}\n")
        (root / name / "max_energy_range_uj").write_text(f"{limit}\n")


def test_energy_from_rapl_counters_with_wrap_around(tmp_path, rss):
    fake_rapl(tmp_path, {"intel-rapl:0": (1_000, 10**12), "intel-rapl:0:0": (7, 10**12),
                         "intel-rapl:1": (9_000_000, 9_999_999)})
    clock = Clock()
    with ResourceMeter(clock=clock, powercap_root=tmp_path) as meter:
        (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2001000\n")
        (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")  # inside package 0
        (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped at 9,999,999
        clock.now += 10
        report = meter.report()
    assert report.energy_source == "RAPL (powercap)" and report.energy_unavailable is None
    assert report.energy_j == pytest.approx((2_000_000 + 1_000_000 + 500_000) * 1e-6)
    assert meter.gamma("energy_j") == pytest.approx(3.5)


def test_energy_is_unavailable_not_invented(tmp_path, rss, monkeypatch):
    with ResourceMeter(powercap_root=tmp_path / "none") as meter:
        pass
    report = meter.report()
    assert report.energy_j is None and report.energy_source is None
    assert "no RAPL package counters" in report.energy_unavailable
    with pytest.raises(ValueError, match="energy_j has no reading here: no RAPL"):
        meter.gamma("energy_j")

    fake_rapl(tmp_path, {"intel-rapl:0": (5, 100)})
    real = energy.read_counter
    monkeypatch.setattr(energy, "read_counter", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with ResourceMeter(powercap_root=tmp_path) as meter:
        pass
    assert meter.report().energy_j is None and "permission denied" in meter.report().energy_unavailable

    monkeypatch.setattr(energy, "read_counter", real)
    meter = ResourceMeter(powercap_root=tmp_path).start()
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()  # the counter goes away mid-run
    assert meter.report().energy_j is None and "stopped being readable" in meter.report().energy_unavailable

    assert "not requested" in ResourceMeter(energy=False).start().report().energy_unavailable


def test_this_machine_reports_energy_only_from_a_real_counter():
    with ResourceMeter() as meter:
        torch.randn(256, 256) @ torch.randn(256, 256)
    report = meter.report()
    assert (report.energy_j is None) == (report.energy_unavailable is not None)
    if report.energy_j is not None:
        assert report.energy_source == "RAPL (powercap)" and report.energy_j >= 0
    assert report.memory_gib_hours > 0 and report.peak_memory_gib > 0.01  # a real RSS


def test_meter_rejects_bad_input():
    with pytest.raises(ValueError, match="CPU or CUDA"):
        ResourceMeter("meta")
    with pytest.raises(ValueError, match="not a torch device"):
        ResourceMeter("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ResourceMeter("cuda")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ResourceMeter(optimizer="adamw")
    with pytest.raises(TypeError, match="energy must be a bool"):
        ResourceMeter(energy="yes")
    with pytest.raises(RuntimeError, match="has not been started"):
        ResourceMeter().report()
    with pytest.raises(ValueError, match="resource must be one of"):
        ResourceMeter().start().gamma("watts")
    with pytest.raises(TypeError, match="optimizer must be"):
        ResourceMeter().attach(odd_model())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_is_the_peak_per_interval_and_energy_is_real_or_unavailable():
    clock = Clock()
    with ResourceMeter("cuda", clock=clock) as meter:
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
        del x
        clock.now += 3600
    report = meter.report()
    assert report.peak_memory_gib >= 0.25 and report.memory_gib_hours >= 0.25
    assert (report.energy_j is None) == (report.energy_unavailable is not None)
    assert report.energy_source in (None, "NVML total energy counter", "NVML power, integrated over samples")
