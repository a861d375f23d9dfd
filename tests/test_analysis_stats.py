"""Block statistics (Gini, shares, concentration, recommended k) and the heavy-tail report."""
import json
import math

import numpy as np
import pytest
import torch

from sparse_grad.analysis import (
    block_stats,
    concentration_curve,
    gini,
    heavy_tail_report,
    module_of,
    smallest_k_holding,
    top_share,
)


def random_mass(n):
    return (torch.rand(n, dtype=torch.float64) ** -2).numpy()


def test_gini_matches_the_mean_absolute_difference_definition():
    for n in (1, 2, 7, 300):
        m = random_mass(n)
        direct = np.abs(m[:, None] - m[None, :]).sum() / (2 * n * n * m.mean())
        assert gini(m) == pytest.approx(direct, abs=1e-12)
    assert gini(np.full(10, 3.0)) == pytest.approx(0.0, abs=1e-15)
    assert gini(np.eye(1, 8)[0]) == pytest.approx(1 - 1 / 8)
    assert math.isnan(gini(np.zeros(5))) and math.isnan(gini([]))


def test_shares_curve_and_smallest_k_agree_with_sorting_by_hand():
    m = random_mass(97)
    desc = np.sort(m)[::-1]
    for p in (0.01, 0.05, 0.1, 0.2, 0.33, 1.0):
        k = math.ceil(p * 97)
        assert top_share(m, p) == pytest.approx(desc[:k].sum() / m.sum())
    fraction, share = concentration_curve(m)
    assert fraction[0] == 0 and fraction[-1] == 1 and share[0] == 0 and share[-1] == pytest.approx(1)
    assert np.all(np.diff(share) >= 0) and share[1] == pytest.approx(desc[0] / m.sum())
    for target in (0.1, 0.5, 0.9, 0.99, 1.0):
        k = smallest_k_holding(m, target)
        assert desc[:k].sum() >= target * m.sum() * (1 - 1e-12)
        assert k == 1 or desc[:k - 1].sum() < target * m.sum()
    assert top_share([0.0, 0.0], 0.5) != top_share([0.0, 0.0], 0.5)  # NaN: no mass, no shares
    assert smallest_k_holding(np.zeros(4), 0.9) == 0


def test_block_stats_are_of_norms_and_mass():
    m = random_mass(500)
    s = block_stats("x", m, target_share=0.8)
    norms = np.sqrt(m)
    assert s.num_blocks == 500 and s.mass == pytest.approx(m.sum())
    assert (s.mean_norm, s.median_norm, s.max_norm) == pytest.approx((norms.mean(), np.median(norms), norms.max()))
    assert s.recommended_k == smallest_k_holding(m, 0.8) and s.recommended_density == s.recommended_k / 500
    assert s.power_law is not None and s.power_law.alpha == pytest.approx(1.0, abs=0.3)
    json.dumps(s.as_dict(), allow_nan=False)  # JSON-ready
    empty = block_stats("none", np.zeros(3))
    assert empty.as_dict()["gini"] is None and empty.power_law is None


def test_module_paths():
    assert module_of("blocks.layers.0.linear1.weight") == "blocks.layers.0.linear1"
    assert module_of("blocks.layers.0.linear1.weight", depth=3) == "blocks.layers.0"
    assert module_of("blocks.layers.0.linear1.weight", depth=9) == "blocks.layers.0.linear1"
    assert module_of("position") == ""


def test_report_groups_blocks_per_module_and_tensor():
    scores = {"a.w": torch.rand(30) ** -2, "a.b": torch.rand(1), "b.c.w": torch.rand(13) ** -2, "p": torch.rand(2)}
    report = heavy_tail_report(scores, block_size=64, steps=3, accumulate="mean")
    assert list(report.modules) == ["a", "b.c", ""]
    assert [s.num_blocks for s in report.modules.values()] == [31, 13, 2]
    assert report.overall.num_blocks == 46
    assert report.overall.mass == pytest.approx(sum(float(s.double().sum()) for s in scores.values()))
    assert report.tensors["a.w"].num_blocks == 30
    assert list(heavy_tail_report(scores, depth=1).modules) == ["a", "b", ""]
    text = report.to_text(per_tensor=True)
    assert "46 blocks of 64 elements, 3 steps (mean)" in text and "(root)" in text and "b.c.w" in text
    json.dumps(report.as_dict(), allow_nan=False)


@pytest.mark.parametrize("scores, kwargs, error, message", [
    ([1.0, 2.0], {}, TypeError, "mapping"),
    ({}, {}, ValueError, "empty"),
    ({"w": torch.ones(2, 2)}, {}, ValueError, r"scores\['w'\] must be 1-D"),
    ({"w": torch.tensor([1.0, -1.0])}, {}, ValueError, r"scores\['w'\] must be finite and >= 0"),
    ({"w": torch.tensor([1.0, float("nan")])}, {}, ValueError, r"scores\['w'\]"),
    ({1: torch.ones(2)}, {}, TypeError, "parameter names"),
    ({"w": torch.ones(2)}, {"depth": 0}, ValueError, "depth"),
    ({"w": torch.ones(2)}, {"target_share": 0.0}, ValueError, "target_share"),
    ({"w": torch.ones(2)}, {"target_share": 1.5}, ValueError, "target_share"),
])
def test_bad_report_input(scores, kwargs, error, message):
    with pytest.raises(error, match=message):
        heavy_tail_report(scores, **kwargs)
