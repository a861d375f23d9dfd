"""sparse_grad.param_groups and Blueprint.param_groups: PEFT-style targeting, per-module
densities, dense small tensors, the no-decay rule, frozen untargeted params."""
import pytest
import torch
from torch import nn

import sparse_grad
from sparse_grad import SparseAdamW, param_groups
from sparse_grad.analysis import GradientMonitor
from sparse_grad.blueprint import Blueprint
from _models import set_grads


class Attention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))


class Layer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.self_attn = Attention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.Linear(4 * width, width))
        self.input_layernorm = nn.LayerNorm(width)


class Model(nn.Module):
    """Named like a transformers decoder: model.layers.N.self_attn.q_proj, ...mlp.0, norm."""
    def __init__(self, width=16, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(64, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)


def names(groups):
    return [[n for n, _ in g["params"]] for g in groups]


def by_name(groups):
    return {n: (g["density"], g["weight_decay"]) for g in groups for n, _ in g["params"]}


def test_a_list_matches_module_name_suffixes_and_freezes_the_rest():
    model = Model()
    groups = param_groups(model, target_modules=["q_proj", "v_proj"], density=0.1, min_sparse_size=0,
                          weight_decay=0.05)
    chosen = by_name(groups)
    expected = {f"layers.{i}.self_attn.{m}.{p}" for i in range(2) for m in ("q_proj", "v_proj")
                for p in ("weight", "bias")}
    assert set(chosen) == expected
    assert all(p.requires_grad == (n in expected) for n, p in model.named_parameters())
    assert chosen["layers.0.self_attn.q_proj.weight"] == (0.1, 0.05)
    assert chosen["layers.0.self_attn.q_proj.bias"] == (0.1, 0.0)  # biases: no decay
    assert [g["density"] for g in groups] == [0.1, 0.1] and names(groups)[0][0] == "layers.0.self_attn.q_proj.weight"


def test_a_name_matches_at_a_dot_boundary_and_covers_submodules():
    model = Model()
    chosen = by_name(param_groups(model, target_modules=["mlp", "proj"], min_sparse_size=0))
    # "mlp" targets its children mlp.0 and mlp.1; "proj" is no whole name component
    assert set(chosen) == {f"layers.{i}.mlp.{j}.{p}" for i in range(2) for j in range(2) for p in ("weight", "bias")}


def test_a_regex_must_match_the_whole_module_path():
    model = Model()
    chosen = by_name(param_groups(model, target_modules=r"layers\.1\.self_attn\.(q|k)_proj", min_sparse_size=0))
    assert set(chosen) == {f"layers.1.self_attn.{m}.{p}" for m in ("q_proj", "k_proj") for p in ("weight", "bias")}
    assert not by_name(param_groups(Model(), target_modules=r"q_proj|norm", min_sparse_size=0)).keys() \
        - {"norm.weight", "norm.bias"}  # "q_proj" alone is no whole path


def test_densities_per_module_and_small_tensors_dense():
    model = Model(width=16)
    groups = param_groups(model, density=0.05, densities={"mlp": 0.2, r"layers\.1\.mlp\.1": 0.5, "k_proj": 0.3},
                          min_sparse_size=300, no_decay=["bias", "norm"])
    chosen = by_name(groups)
    assert chosen["layers.0.mlp.0.weight"] == (0.2, 0.01)  # 1024 elements
    assert chosen["layers.1.mlp.1.weight"] == (0.5, 0.01)  # the innermost matching module decides
    assert chosen["layers.0.self_attn.k_proj.weight"] == (1.0, 0.01)  # 256 < min_sparse_size: dense
    assert chosen["layers.0.mlp.0.bias"] == (1.0, 0.0)
    assert chosen["embed_tokens.weight"] == (0.05, 0.01)
    assert chosen["norm.weight"] == (1.0, 0.0)
    assert all(p.requires_grad for p in model.parameters())  # no target_modules: everything trains
    assert len({(g["density"], g["weight_decay"]) for g in groups}) == len(groups)


def test_the_hf_no_decay_rule_by_default():
    model = Model()
    chosen = by_name(param_groups(model, min_sparse_size=0, weight_decay=0.1))
    no_decay = {n for n, (_, wd) in chosen.items() if wd == 0.0}
    assert no_decay == {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n}
    assert no_decay == set(chosen) - sparse_grad.targeting.decay_parameter_names(model)


def test_frozen_params_stay_out_and_groups_train():
    model = Model()
    model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model, target_modules=["embed_tokens", "mlp"], density=0.25, min_sparse_size=100)
    assert "embed_tokens.weight" not in by_name(groups)
    opt = SparseAdamW(groups, lr=1e-2, block_size=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_grads(model)
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n for n in changed)
    assert opt.param_groups[0]["param_names"][0] == "layers.0.mlp.0.weight"  # names kept for blueprints


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(target_modules=["nothing"]), ValueError, "target_modules matched no trainable parameter"),
    (dict(target_modules=3), TypeError, "target_modules must be None, a regex string or a list"),
    (dict(target_modules=[""]), TypeError, "target_modules must hold non-empty module-name strings"),
    (dict(target_modules={"q_proj": 1}), TypeError, "target_modules must be None"),
    (dict(target_modules="(q_proj"), ValueError, "target_modules: '\\(q_proj' is not a valid regular expression"),
    (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
    (dict(densities={"mlp": 2.0}), ValueError, r"densities\['mlp'\] must be in \(0, 1\]"),
    (dict(densities=[("mlp", 0.1)]), TypeError, "densities must be a dict"),
    (dict(densities={"(": 0.1}), ValueError, r"densities\['\('\]: '\(' is not a valid regular expression"),
    (dict(min_sparse_size=-1), ValueError, "min_sparse_size must be a non-negative int"),
    (dict(min_sparse_size=1.5), TypeError, "min_sparse_size must be a non-negative int"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (dict(no_decay="bias"), TypeError, "no_decay must be None"),
    (dict(no_decay=["("]), ValueError, "no_decay: '\\(' is not a valid regular expression"),
])
def test_bad_input_is_named_and_changes_nothing(kwargs, error, message):
    model = Model()
    with pytest.raises(error, match=message):
        param_groups(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        param_groups("model")


def recorded_blueprint(model, block_size=8):
    monitor = GradientMonitor(model, block_size=block_size)
    for _ in range(3):
        set_grads(model)
        with torch.no_grad():  # much more gradient mass in layer 0's mlp: its density is lower
            for p in model.layers[0].mlp.parameters():
                flat = p.grad.view(-1)
                flat[:8] *= 1000.0
        monitor.update()
    return Blueprint.from_monitor(monitor, target_share=0.9, depth=3)


def test_blueprint_groups_use_its_recommended_densities():
    torch.manual_seed(0)
    model = Model()
    bp = recorded_blueprint(model)
    recommended = bp.recommendations()["modules"]
    groups = bp.param_groups(model, target_modules=["mlp", "self_attn"], min_sparse_size=0, weight_decay=0.05)
    chosen = by_name(groups)
    assert set(chosen) == {n for n, _ in model.named_parameters() if ".mlp." in n or ".self_attn." in n}
    for name, (density, decay) in chosen.items():
        assert density == recommended[".".join(name.split(".")[:3])]["density"]
        assert decay == (0.0 if name.endswith("bias") else 0.05)
    assert chosen["layers.0.mlp.0.weight"][0] < chosen["layers.1.mlp.0.weight"][0]
    assert all(g["block_size"] == 8 for g in groups)
    opt = SparseAdamW(groups, blueprint=bp, lr=1e-2)  # the groups fit the blueprint they came from
    set_grads(model)
    opt.step()


def test_blueprint_groups_refuse_params_it_has_no_scores_for():
    model = Model()
    bp = recorded_blueprint(model)
    bigger = Model(layers=3)
    with pytest.raises(ValueError, match="no scores for the targeted parameter 'layers.2.self_attn.q_proj.weight'"):
        bp.param_groups(bigger)
    other = Model(width=8)
    with pytest.raises(ValueError, match="parameter 'embed_tokens.weight' has shape"):
        bp.param_groups(other)
    assert all(p.requires_grad for p in bigger.parameters())
