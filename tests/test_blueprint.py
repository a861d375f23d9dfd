"""Gradient blueprints: file round trip, validation, combine, re-blocking, and the selection
SparseAdamW makes with one."""
import json

import pytest
import torch
from _models import (
    no_host_sync,
    odd_model,
    one_thread,
    set_grads,
    step_counts,
    tiny_lm,
    updated_blocks,
)
from _utils import assert_same

from sparse_grad import SparseAdamW, library, ops
from sparse_grad.analysis import GradientMonitor, smallest_k_holding
from sparse_grad.analysis.files import save_tensors
from sparse_grad.blueprint import Blueprint
from sparse_grad.demo import stdlib_bytes, train_steps


def recorded(model, block_size=8, steps=3, scale=1.0):
    monitor = GradientMonitor(model, block_size=block_size)
    for _ in range(steps):
        for g in set_grads(model):
            g.mul_(scale)
        monitor.update()
    return Blueprint.from_monitor(monitor)


def test_round_trip_of_a_trained_model_gives_identical_masks(tmp_path):
    model = tiny_lm()
    monitor = GradientMonitor(model, block_size=64)
    opt = SparseAdamW(model.parameters(), lr=3e-3, density=0.3, block_size=64)
    monitor.attach(opt)
    with one_thread():
        train_steps(model, opt, stdlib_bytes(50_000), steps=12, batch=8, context=16)
    bp = Blueprint.from_monitor(monitor, target_share=0.8)
    bp.save(tmp_path / "bp.safetensors")
    back = Blueprint.load(tmp_path / "bp.safetensors")
    back.validate(model, block_size=64)
    assert back.header() == bp.header() and back.fingerprint == bp.fingerprint
    assert_same(back.scores, bp.scores)
    for density in (0.05, 0.3, 1.0):
        for scope in ("global", "tensor"):
            assert_same(back.to_mask(density, scope), bp.to_mask(density, scope))
    mask = bp.to_mask(0.3)
    assert sum(int(m.sum()) for m in mask.values()) == ops.num_selected(0.3, bp.num_blocks)
    assert all(int(m.sum()) >= 1 for m in bp.to_mask(0.01, "tensor").values())
    assert "fingerprint" in bp.describe() and "recommended" in bp.describe()


def test_header_documents_the_model_statistics_and_recommendations(tmp_path):
    model = odd_model()
    bp = recorded(model, steps=2)
    bp.save(tmp_path / "bp.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bp.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["sparse_grad.blueprint"])
        assert sorted(f.keys()) == sorted(n for n, _ in model.named_parameters())
    assert header["format_version"] == 1 and header["block_size"] == 8 and header["steps"] == 2
    assert header["parameters"][0] == {"name": "0.weight", "shape": [37, 13], "dtype": "float32", "num_blocks": 61}
    assert list(header["statistics"]["modules"]) == ["0", "2", "3"]
    for module, rec in header["recommendations"]["modules"].items():
        mass = torch.cat([s for n, s in bp.scores.items() if n.startswith(module + ".")])
        assert rec["k"] == smallest_k_holding(mass.double().numpy(), 0.9)
        assert rec["density"] == pytest.approx(rec["k"] / mass.numel())


def test_validate_names_the_first_mismatch():
    bp = recorded(odd_model())
    bp.validate(odd_model().double())  # dtypes may differ
    bigger = odd_model()
    bigger.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="no scores for the model's parameter 'extra'"):
        bp.validate(bigger)
    partly_frozen = odd_model()
    partly_frozen[3].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="its parameter '3.bias' is not a trainable parameter of the model"):
        bp.validate(partly_frozen)
    other_shape = odd_model()
    other_shape[0] = torch.nn.Linear(13, 36)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(36, 13\) in the model, \(37, 13\) in the blueprint"):
        bp.validate(other_shape)
    with pytest.raises(ValueError, match=r"block_size 8, not 16; re-block it explicitly with blueprint.reblock\(16\)"):
        bp.validate(odd_model(), block_size=16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bp.validate({"0.weight": torch.zeros(37, 13)})


def test_load_refuses_what_is_not_a_valid_blueprint(tmp_path):
    bp = recorded(odd_model())
    with pytest.raises(FileNotFoundError, match="no sparse_grad blueprint at"):
        Blueprint.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Blueprint.load(tmp_path / "junk")
    monitor = GradientMonitor(odd_model(), block_size=8)
    monitor.save(tmp_path / "dump.safetensors")
    with pytest.raises(ValueError, match="not a sparse_grad blueprint"):
        Blueprint.load(tmp_path / "dump.safetensors")
    for change, message in [
        (lambda h: h.update(format_version=2), "format version 2; this sparse_grad"),
        (lambda h: h["parameters"][1].update(dtype="float16"), "fingerprint in the header does not match"),
        (lambda h: h["parameters"].append({"name": "9.w", "shape": [2], "dtype": "float32", "num_blocks": 1}),
         "lists parameter '9.w', but the file has no scores for it"),
    ]:
        header = bp.header()
        change(header)
        save_tensors(tmp_path / "bad.safetensors", bp.scores, "sparse_grad.blueprint", header)
        with pytest.raises(ValueError, match=message):
            Blueprint.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bp.save(tmp_path / "no" / "such" / "folder.safetensors")


def test_combine_weighs_normalized_masses():
    model = odd_model()
    a, b = recorded(model, scale=1.0), recorded(model, scale=1000.0)
    combined = Blueprint.combine([a, b], weights=[3, 1])
    total_a = sum(float(s.double().sum()) for s in a.scores.values())
    total_b = sum(float(s.double().sum()) for s in b.scores.values())
    for name in a.names:
        expected = 0.75 * a.scores[name].double() / total_a + 0.25 * b.scores[name].double() / total_b
        torch.testing.assert_close(combined.scores[name].double(), expected, rtol=1e-6, atol=0)
    assert sum(float(s.double().sum()) for s in combined.scores.values()) == pytest.approx(1.0)
    assert combined.steps == 6 and combined.accumulate == "combined" and "weights [0.75, 0.25]" in combined.provenance[-1]
    assert_same(Blueprint.combine([a]).to_mask(0.2), a.to_mask(0.2))


def test_combine_rejects_mismatches():
    a = recorded(odd_model())
    other = odd_model()
    other[2] = torch.nn.Linear(37, 6)
    cases = [
        (([a, a.reblock(16)],), ValueError, r"blueprints\[1\] has block_size 16, blueprints\[0\] 8"),
        (([a, recorded(other)],), ValueError, r"'2.weight' has shape \(6, 37\) in blueprints\[1\]"),
        (([a, a], [1.0]), ValueError, "weights has 1 entries for 2 blueprints"),
        (([a, a], [1.0, -1.0]), ValueError, r"weights\[1\] must be >= 0"),
        (([a, a], [0, 0]), ValueError, "must not all be 0"),
        (([a, "b.safetensors"],), TypeError, r"blueprints\[1\] must be a Blueprint"),
        ((a,), TypeError, "non-empty list"),
        (([],), TypeError, "non-empty list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            Blueprint.combine(*args)
    zero = Blueprint({n: torch.zeros_like(s) for n, s in a.scores.items()}, block_size=8, shapes=a.shapes,
                     dtypes=a.dtypes)
    with pytest.raises(ValueError, match=r"blueprints\[1\] holds no gradient mass"):
        Blueprint.combine([a, zero])


def test_reblock_is_exact_for_multiples_and_keeps_mass_otherwise():
    model = odd_model()
    bp = recorded(model, steps=1)  # one step: the scores are that step's sums of squares
    grads = [p.grad for p in model.parameters()]
    coarse = bp.reblock(32)
    assert coarse.block_size == 32 and "8 -> 32 (exact)" in coarse.provenance[-1]
    direct = ops.block_sqnorms(grads, 32).split([s.numel() for s in coarse.scores.values()])
    for got, expected in zip(coarse.scores.values(), direct):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for size in (12, 5, 3, 1001):
        other = bp.reblock(size)
        assert "spread evenly" in other.provenance[-1] and other.block_size == size
        for name in bp.names:
            assert other.scores[name].numel() == -(-torch.Size(bp.shapes[name]).numel() // size)
            torch.testing.assert_close(other.scores[name].double().sum(), bp.scores[name].double().sum(), rtol=1e-6, atol=0)
    for p in model.parameters():  # even magnitudes: the even spread is exact at any size
        p.grad = torch.randint(0, 2, p.shape).float() * 2 - 1
    even = GradientMonitor(model, block_size=8)
    even.update()
    spread = Blueprint.from_monitor(even).reblock(12)
    for got, expected in zip(spread.scores.values(), ops.block_sqnorms([p.grad for p in model.parameters()], 12)
                             .split([s.numel() for s in spread.scores.values()])):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        bp.reblock(0)


def test_constructor_and_from_monitor_reject_bad_input():
    model = odd_model()
    with pytest.raises(ValueError, match="no steps"):
        Blueprint.from_monitor(GradientMonitor(model, block_size=8))
    with pytest.raises(TypeError, match="GradientMonitor or GradientSnapshot"):
        Blueprint.from_monitor(model)
    good = {"block_size": 4, "shapes": {"w": (10,)}, "dtypes": {"w": "float32"}}
    with pytest.raises(ValueError, match=r"scores\['w'\] must be a 1-D tensor of 3 block scores"):
        Blueprint({"w": torch.ones(4)}, **good)
    with pytest.raises(ValueError, match=r"scores\['w'\] must be finite and >= 0"):
        Blueprint({"w": torch.tensor([1.0, -1.0, 0.0])}, **good)
    with pytest.raises(ValueError, match="no shape or dtype given for parameter 'v'"):
        Blueprint({"v": torch.ones(3)}, **good)


# -- selection guided by a blueprint ---------------------------------------------------------------


def run_steps(opt, model, grads_per_step):
    """Step with the given grads; the blocks updated at each step (ids over all params)."""
    params = list(model.parameters())
    updated = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = step_counts(opt, params)
        opt.step()
        updated.append(updated_blocks(opt, params, before))
    return updated


def fresh_grads(model, steps):
    return [set_grads(model) for _ in range(steps)]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_weight_zero_is_no_blueprint_and_weight_one_is_its_mask(case, scope, monkeypatch):
    device, backend = case
    model = odd_model(device)
    bp = recorded(model)
    grads = fresh_grads(model, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"lr": 1e-2, "density": 0.2, "block_size": 8, "scope": scope, "backend": backend}

    plain = run_steps(SparseAdamW(model.parameters(), **kwargs), model, grads)
    after_plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    zero = run_steps(SparseAdamW(model.named_parameters(), blueprint=bp, blueprint_weight=0.0, **kwargs), model, grads)
    assert zero == plain
    assert_same(model.state_dict(), after_plain)

    model.load_state_dict(start)
    monkeypatch.setattr(ops.unchecked, "block_sqnorms", lambda *a: pytest.fail("α = 1 needs no norm pass"))
    fixed = run_steps(SparseAdamW(model.named_parameters(), blueprint=bp, blueprint_weight=1.0, **kwargs), model, grads)
    mask = torch.cat(list(bp.to_mask(0.2, scope).values()))
    assert fixed == [set(torch.nonzero(mask).flatten().tolist())] * 3


def test_weight_in_between_ranks_the_blend_of_normalized_scores(case):
    device, backend = case
    model = odd_model(device)
    bp = recorded(model)
    grads = fresh_grads(model, 3)
    for g in grads[1]:
        g.mul_(1e4)  # the current scores' scale must not matter
    alpha = 0.3
    opt = SparseAdamW(model.named_parameters(), density=0.25, block_size=8, backend=backend, blueprint=bp,
                      blueprint_weight=alpha)
    updated = run_steps(opt, model, grads)
    b = torch.cat(list(bp.scores.values())).double()
    for step, gs in enumerate(grads):
        c = ops.block_sqnorms([g.cpu() for g in gs], 8).double()
        blend = (alpha * b / b.sum() + (1 - alpha) * c / c.sum()).float()
        assert updated[step] == set(ops.select_blocks(blend, density=0.25).tolist())


def test_blend_takes_blocks_from_both_sides():
    """The blueprint favours the first tensor, this step's grads the second: α = 0.5 takes from
    both, the extremes from one each."""
    model = odd_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    scores = {n: torch.full((-(-p.numel() // 8),), 10.0 if n == "0.weight" else 0.01)
              for n, p in model.named_parameters()}
    bp = Blueprint(scores, block_size=8, shapes=shapes, dtypes=dict.fromkeys(names, "float32"))
    grads = [[torch.full_like(p, 5.0 if n == "0.bias" else 0.01) for n, p in model.named_parameters()]]
    picked = {}
    for alpha in (0.0, 0.5, 1.0):
        opt = SparseAdamW(model.named_parameters(), density=0.1, block_size=8, blueprint=bp, blueprint_weight=alpha)
        picked[alpha] = run_steps(opt, model, grads)[0]
    first, second = set(range(61)), set(range(61, 66))  # blocks of 0.weight, of 0.bias
    assert picked[1.0] <= first and second <= picked[0.0]
    assert picked[0.5] & first and picked[0.5] & second


def test_named_params_and_a_bound_blueprint_select_alike():
    model = odd_model()
    bp = recorded(model)
    grads = fresh_grads(model, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    named = run_steps(SparseAdamW(model.named_parameters(), density=0.2, block_size=8, blueprint=bp), model, grads)
    model.load_state_dict(start)
    bound = run_steps(SparseAdamW(model.parameters(), density=0.2, block_size=8, blueprint=bp.bind(model)),
                      model, grads)
    assert named == bound
    opt = SparseAdamW(model.named_parameters(), block_size=8, blueprint=bp)
    assert opt.param_groups[0]["blueprint_weight"] == 0.5  # the default with a blueprint
    saved = opt.state_dict()
    assert saved["param_groups"][0]["blueprint_weight"] == 0.5
    without = SparseAdamW(model.named_parameters(), block_size=8)
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]\['blueprint_weight'\] is 0.5, but"):
        without.load_state_dict(saved)
    assert without.param_groups[0]["blueprint_weight"] == 0.0


def test_bad_blueprint_arguments_name_the_problem():
    model = odd_model()
    bp = recorded(model)
    with pytest.raises(TypeError, match="blueprint must have a block_scores"):
        SparseAdamW(model.parameters(), blueprint="bp.safetensors")
    with pytest.raises(ValueError, match="blueprint_weight is 0.3, but SparseAdamW has no blueprint"):
        SparseAdamW(model.parameters(), blueprint_weight=0.3)
    with pytest.raises(ValueError, match=r"blueprint_weight must be in \[0, 1\]"):
        SparseAdamW(model.named_parameters(), blueprint=bp, blueprint_weight=1.5)
    with pytest.raises(ValueError, match=r"bind\(model\)"):
        SparseAdamW(model.parameters(), block_size=8, blueprint=recorded(model))
    with pytest.raises(ValueError, match=r"block_size 8, the param group uses 16: .*reblock\(16\)"):
        SparseAdamW(model.named_parameters(), block_size=16, blueprint=bp)
    SparseAdamW(model.named_parameters(), block_size=16, blueprint=bp.reblock(16))
    stranger = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"params\[6\] \(shape \(4,\)\) is not a parameter of the model the blueprint"):
        SparseAdamW([*model.parameters(), stranger], block_size=8, blueprint=bp.bind(model))
    with pytest.raises(ValueError, match="the blueprint has no scores for parameter 'head.w'"):
        SparseAdamW([*model.named_parameters(), ("head.w", stranger)], block_size=8, blueprint=bp)
    opt = SparseAdamW(model.named_parameters(), block_size=8, blueprint=bp)
    with pytest.raises(ValueError, match="no scores for parameter 'x'"):
        opt.add_param_group({"params": [("x", stranger)]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("x", stranger)], "blueprint_weight": 0.0})  # a group may opt out
    opt.param_groups[0]["blueprint_weight"] = 2.0
    set_grads(model)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['blueprint_weight'\] must be in \[0, 1\]"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blended_selection_makes_no_host_sync_on_cuda():
    model = odd_model("cuda")
    bp = recorded(model)
    opt = SparseAdamW(model.named_parameters(), density=0.2, block_size=8, blueprint=bp, blueprint_weight=0.4)
    set_grads(model)
    opt.step()  # the first step builds state and caches the blueprint's device scores
    with no_host_sync():
        for _ in range(3):
            set_grads(model)
            opt.step()
