"""Coordinated data selection (sparse_grad.data): per-example block norms against torch.func
per-example gradients, the selector and sampler, and that scoring writes nothing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _models import one_thread, set_grads, step_counts, tiny_lm, updated_blocks
from _utils import assert_same, heavy_tailed, snapshot
from torch import nn
from torch.func import functional_call, grad, vmap

from sparse_grad import SparseAdamW
from sparse_grad.blueprint import Blueprint
from sparse_grad.data import (
    InfluenceSampler,
    InfluenceSelector,
    PerExampleNorms,
    resolve_blocks,
    top_indices,
)
from sparse_grad.demo import batches, lm_losses, stdlib_bytes, window_sampler


class Mixed(nn.Module):
    """Every route: an Embedding with a padding row, a learned position table (torch.func), a
    Linear called twice, a Linear over a 2-D token grid, a LayerNorm over two dims, and a
    Linear without bias."""

    def __init__(self, vocab=11, dim=7, hidden=13):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=2)
        self.position = nn.Parameter(torch.randn(5, dim))
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm((1, hidden))
        self.grid = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[:tokens.shape[1]]
        h = torch.tanh(self.up(h))
        h = self.norm(h.unsqueeze(2)).squeeze(2)
        h = h + 0.5 * self.up(h[..., :self.embed.embedding_dim])  # the same Linear again
        grid = self.grid(torch.stack([h, h.flip(1)], 2))  # [B, T, 2, hidden]
        return self.head(grid.sum(2))


def random_batch(n=6, length=5, vocab=11):
    x = torch.randint(0, vocab, (n, length))
    x[0, :2] = 2  # padding tokens: their embedding row gets no gradient
    return x, torch.randint(0, vocab, (n, length))


def reference_sqnorms(model, loss, batch, blocks):
    """Per-example gradients by torch.func (vmap over grad), squared and summed per block, fp64."""
    params = {b.name: b.param.detach() for b in blocks}

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, b):
            return loss(self.model, b)

    def one(p, example):
        single = tuple(t.unsqueeze(0) for t in example)
        return functional_call(Wrapped(), {f"model.{n}": v for n, v in p.items()}, (single,), strict=False).sum()

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # SDPA has no other vmap rule
        grads = vmap(grad(one), in_dims=(None, 0))(params, batch)
    columns = []
    for b in blocks:
        flat = grads[b.name].reshape(grads[b.name].shape[0], -1).double()
        n, size = flat.shape[1], b.block_size
        count = math.ceil(n / size)
        sq = F.pad(flat, (0, count * size - n)).square().view(-1, count, size).sum(-1)
        columns.append(sq[:, b.block_ids])
    return torch.cat(columns, 1)


def random_blocks(model, block_size, share=0.5):
    masks = {n: torch.rand(math.ceil(p.numel() / block_size)) < share for n, p in model.named_parameters()}
    next(iter(masks.values()))[0] = True  # never none at all (a draw of few blocks can miss every one)
    return resolve_blocks(model, masks, block_size=block_size)


def assert_matches_reference(got, expected, dtype):
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    # atol: relative to the largest entry, for the entries that are sums of a few tiny squares
    expected = expected.detach()
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * 1e-3 * float(expected.max()))


@pytest.mark.parametrize("method", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("block_size", [1, 5, 7, 8, 13, 14, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_sqnorms_match_torch_func(dtype, block_size, method):
    """Odd sizes: blocks that tile the rows (1, 7 of the 7-wide embedding), cut rows in two
    (8 < 13), do not divide them (5), hold whole rows (13, 14) or several rows (100) or whole
    tensors (1000); partial last blocks everywhere."""
    model = Mixed().to(dtype)
    batch = random_batch()
    blocks = random_blocks(model, block_size)
    norms = PerExampleNorms(model, lm_losses, linear_method=method)
    got = norms.block_sqnorms(batch, blocks)
    assert got.dtype == dtype and got.shape == (6, sum(b.block_ids.numel() for b in blocks))
    assert not got.requires_grad
    assert_matches_reference(got, reference_sqnorms(model, lm_losses, batch, blocks), dtype)
    assert norms.routes == {"embed.weight": "embedding", "position": "torch.func", "up.weight": "linear",
                            "up.bias": "linear", "norm.weight": "layernorm", "norm.bias": "layernorm",
                            "grid.weight": "linear", "head.weight": "linear", "head.bias": "linear"}
    if method != "auto" and block_size == 1:  # every row is whole: the chosen form did them all
        assert norms.last_methods["head.weight"] == method


def test_demo_model_all_blocks_match_torch_func():
    model = tiny_lm()
    x, y = next(batches(stdlib_bytes(20_000), 1, 5, 16, seed=3))
    blocks = resolve_blocks(model, None, block_size=100)
    norms = PerExampleNorms(model, lm_losses)
    got = norms.block_sqnorms((x, y), blocks)
    assert_matches_reference(got, reference_sqnorms(model, lm_losses, (x, y), blocks), torch.float32)
    assert {n for n, route in norms.routes.items() if route == "torch.func"} == {"position"}
    assert set(norms.last_methods.values()) <= {"ghost", "explicit", "embedding", "layernorm", "torch.func"}


def test_layers_called_functionally_or_by_keyword_are_still_exact():
    """nn.MultiheadAttention uses its out_proj Linear's weight without calling the module: the
    hook never fires, so that weight goes to torch.func; a Linear called as fc(input=x) is hooked."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 11)

        def forward(self, tokens):
            h = self.embed(tokens)
            return self.head(input=self.attn(h, h, h, need_weights=False)[0])

    model = Attention()
    batch = random_batch(n=4)
    blocks = resolve_blocks(model, None, block_size=6)
    norms = PerExampleNorms(model, lm_losses)
    got = norms.block_sqnorms(batch, blocks)
    assert_matches_reference(got, reference_sqnorms(model, lm_losses, batch, blocks), torch.float32)
    assert norms.routes["attn.out_proj.weight"] == "linear" and norms.routes["attn.in_proj_weight"] == "torch.func"
    assert norms.last_methods["attn.out_proj.weight"] == "torch.func"
    assert norms.last_methods["head.weight"] in ("ghost", "explicit")


def test_auto_picks_the_cheaper_form_by_the_sizes():
    """One token per example: the ghost form costs T²(in + rows) ≪ T·rows·in."""
    model = nn.Sequential(nn.Embedding(20, 64), nn.Linear(64, 64))

    def loss(m, batch):
        return m(batch).square().mean((1, 2))

    norms = PerExampleNorms(model, loss)
    blocks = resolve_blocks(model, None, block_size=64)
    norms.block_sqnorms(torch.randint(0, 20, (4, 1)), blocks)
    assert norms.last_methods["1.weight"] == "ghost"
    norms.block_sqnorms(torch.randint(0, 20, (4, 300)), blocks)  # 300 tokens > rows·in/(rows+in)
    assert norms.last_methods["1.weight"] == "explicit"


def test_selector_scores_are_summed_block_norms_and_select_the_top_share():
    model = Mixed()
    batch = random_batch(n=10)
    blocks = random_blocks(model, 8)
    mapping = {b.name: b.block_ids for b in blocks}
    selector = InfluenceSelector(model, lm_losses, blocks=mapping, block_size=8, data_fraction=0.3)
    expected = reference_sqnorms(model, lm_losses, batch, blocks).sqrt().sum(1)
    scores = selector.score(batch)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0)
    chosen = selector.select(batch)
    assert chosen.indices.tolist() == torch.argsort(expected, descending=True)[:3].tolist()  # ceil(0.3·10)
    chunked = InfluenceSelector(model, lm_losses, blocks=mapping, block_size=8, chunk_size=3)
    torch.testing.assert_close(chunked.score(batch), scores, rtol=1e-6, atol=0)


def test_top_indices_ties_go_to_the_lower_index_and_nan_ranks_last():
    scores = torch.tensor([1.0, float("nan"), 3.0, 3.0, 0.5])
    assert top_indices(scores, 3).tolist() == [2, 3, 0]
    assert top_indices(scores, 5).tolist() == [2, 3, 0, 4, 1]


def assert_maps_ids_to_params(model, opt, params, ids):
    """resolve_blocks(model, opt) names the same blocks as the group-global ``ids`` over ``params``."""
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + math.ceil(p.numel() / 64))
    names = {id(p): n for n, p in model.named_parameters()}
    want = set()
    for i in ids.tolist():
        t = max(j for j in range(len(params)) if offsets[j] <= i)
        want.add((names[id(params[t])], i - offsets[t]))
    assert {(b.name, int(i)) for b in resolve_blocks(model, opt) for i in b.block_ids} == want


def test_blocks_follow_the_optimizer_selection_and_a_blueprint():
    model = tiny_lm()
    opt = SparseAdamW(model.parameters(), density=0.2, block_size=64)
    assert opt.selected_blocks() == []
    before = resolve_blocks(model, opt)  # before the first step: every block
    assert sum(b.block_ids.numel() for b in before) == sum(math.ceil(p.numel() / 64) for p in model.parameters())
    params = list(model.parameters())
    for _ in range(2):
        set_grads(model)
        counts = step_counts(opt, params)
        opt.step()
    [(index, group_params, ids, block_size)] = opt.selected_blocks()
    assert index == 0 and block_size == 64 and len(group_params) == len(params)
    assert set(ids.tolist()) == updated_blocks(opt, params, counts)
    resumed = SparseAdamW(model.parameters(), density=0.2, block_size=64)
    resumed.load_state_dict(opt.state_dict())
    assert_same(resumed.selected_blocks(), opt.selected_blocks())
    assert_maps_ids_to_params(model, opt, params, ids)
    set_grads(model, skip=("layers.0.attn_qkv.bias",))  # without a grad: no part in the selection
    opt.step()
    [(_, without, ids, _)] = opt.selected_blocks()
    assert len(without) == len(params) - 1 and all(p is not model.layers[0].attn_qkv.bias for p in without)
    assert_maps_ids_to_params(model, opt, without, ids)

    bp = Blueprint({n: torch.rand(math.ceil(p.numel() / 32)) for n, p in model.named_parameters()}, block_size=32,
                   shapes={n: p.shape for n, p in model.named_parameters()},
                   dtypes={n: str(p.dtype) for n, p in model.named_parameters()})
    mask = bp.to_mask(0.1)
    from_bp = resolve_blocks(model, bp, density=0.1)
    assert {b.name: b.block_ids.tolist() for b in from_bp} == {
        n: torch.nonzero(m).flatten().tolist() for n, m in mask.items() if m.any()}


def test_scoring_writes_no_parameter_grad_or_optimizer_state():
    model = Mixed()
    opt = SparseAdamW(model.parameters(), density=0.5, block_size=4, score_ema=0.5)
    for _ in range(2):
        set_grads(model)
        opt.step()
    set_grads(model)  # gradients already accumulated for the next step
    params, grads = snapshot(dict(model.named_parameters())), snapshot({n: p.grad for n, p in model.named_parameters()})
    state, selections = snapshot(opt.state_dict()), snapshot(opt.selected_blocks())
    selector = InfluenceSelector(model, lm_losses, blocks=opt)
    selector.select(random_batch())
    selector.norms.block_sqnorms(random_batch(), resolve_blocks(model, None, block_size=3))  # torch.func too
    assert_same(dict(model.named_parameters()), params)
    assert_same({n: p.grad for n, p in model.named_parameters()}, grads)
    assert_same(opt.state_dict(), state)
    assert_same(opt.selected_blocks(), selections)


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_deterministic_and_keeps_the_top_of_each_pool():
    model = tiny_lm()
    data = stdlib_bytes(20_000)
    selector = InfluenceSelector(model, lm_losses, block_size=64, data_fraction=0.25)
    draws = []

    def draw(n, generator):
        draws.append(n)
        return window_sampler(data, 16)(n, generator)

    with one_thread():
        sampler = InfluenceSampler(selector, draw, batch_size=3, refresh_every=2, seed=5)
        first = take(sampler, 4)
        assert draws == [24, 24] and sampler.pools == 2 and sampler.scored == 48 and sampler.scoring_s > 0
        assert_same(take(InfluenceSampler(selector, draw, batch_size=3, refresh_every=2, seed=5), 4), first)
        other = take(InfluenceSampler(selector, draw, batch_size=3, refresh_every=2, seed=6), 4)
        assert not torch.equal(other[0][0], first[0][0])
        pool = window_sampler(data, 16)(24, torch.Generator().manual_seed(5))
        top = top_indices(selector.score(pool), 6)
    chosen = torch.cat([first[0][0], first[1][0]])
    assert sorted(map(tuple, chosen.tolist())) == sorted(map(tuple, pool[0][top].tolist()))

    random = InfluenceSampler(selector, window_sampler(data, 16), batch_size=3, refresh_every=2, seed=5,
                              selection="random")
    batches_ = take(random, 2)
    pool_rows = {tuple(r) for r in pool[0].tolist()}  # the same pool: the generator is seeded alike
    assert all(tuple(r) in pool_rows for b in batches_ for r in b[0].tolist()) and random.scored == 0


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_data_fraction_outside_0_1_is_rejected(fraction):
    with pytest.raises(ValueError, match="data_fraction"):
        InfluenceSelector(Mixed(), lm_losses, block_size=8, data_fraction=fraction)
    with pytest.raises(TypeError, match="data_fraction"):
        InfluenceSelector(Mixed(), lm_losses, block_size=8, data_fraction=True)


def test_unsupported_models_and_modules_raise_clear_errors():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Embedding"):
        PerExampleNorms(nn.Sequential(nn.Conv1d(2, 2, 3)), lm_losses)
    with pytest.raises(ValueError, match="max_norm"):
        PerExampleNorms(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 2)), lm_losses)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        PerExampleNorms(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)), lm_losses)
    batch_norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    norms = PerExampleNorms(batch_norm, lambda m, x: m(x).sum(1))
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        norms.block_sqnorms(torch.randn(5, 3), resolve_blocks(batch_norm, None, block_size=4))
    batch_norm.eval()
    assert norms.block_sqnorms(torch.randn(5, 3), resolve_blocks(batch_norm, None, block_size=4)).shape[0] == 5


def test_bad_losses_batches_and_blocks_raise_clear_errors():
    model = Mixed()
    blocks = resolve_blocks(model, None, block_size=8)
    with pytest.raises(ValueError, match="one floating loss per example"):
        PerExampleNorms(model, lambda m, b: lm_losses(m, b).mean()).block_sqnorms(random_batch(), blocks)
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    with pytest.raises(ValueError, match="modified in place"):
        PerExampleNorms(inplace, lambda m, x: m(x).sum(1)).block_sqnorms(
            torch.randn(5, 3), resolve_blocks(inplace, None, block_size=4))
    flat = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="leading dim"):
        PerExampleNorms(flat, lambda m, x: m(x.flatten(0, 1)).view(5, -1).sum(1)).block_sqnorms(
            torch.randn(5, 2, 3), resolve_blocks(flat, None, block_size=4))
    with pytest.raises(ValueError, match="same leading"):
        PerExampleNorms(model, lm_losses).block_sqnorms((torch.zeros(3, 5).long(), torch.zeros(4, 5).long()),
                                                          blocks)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        resolve_blocks(model, {"nope": torch.tensor([0])}, block_size=8)
    with pytest.raises(ValueError, match="outside"):
        resolve_blocks(model, {"head.bias": torch.tensor([2])}, block_size=8)
    with pytest.raises(ValueError, match="block_size is required"):
        InfluenceSelector(model, lm_losses)
    other = SparseAdamW(nn.Linear(2, 2).parameters(), density=0.5, block_size=2)
    with pytest.raises(ValueError, match="not a trainable parameter of the model"):
        InfluenceSelector(model, lm_losses, blocks=other)
    selector = InfluenceSelector(model, lm_losses, block_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        InfluenceSampler(selector, window_sampler(stdlib_bytes(1000), 5), batch_size=0)
    with pytest.raises(ValueError, match="selection"):
        InfluenceSampler(selector, window_sampler(stdlib_bytes(1000), 5), batch_size=2, selection="best")


def test_gradients_of_heavy_tailed_weights_in_fp64():
    """Weights spanning orders of magnitude: the ghost and explicit forms agree with torch.func."""
    model = Mixed().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(heavy_tailed(p.shape, torch.float64) * 0.3)
    blocks = random_blocks(model, 6, share=0.7)
    batch = random_batch(n=4)
    expected = reference_sqnorms(model, lm_losses, batch, blocks)
    for method in ("ghost", "explicit"):
        got = PerExampleNorms(model, lm_losses, linear_method=method).block_sqnorms(batch, blocks)
        assert_matches_reference(got, expected, torch.float64)


def test_the_experiment_writes_a_finite_table_and_json(tmp_path, capsys):
    from sparse_grad.cli import main
    from sparse_grad.demo import data_selection

    args = ["demo", "--data-selection", "--quick", "--out", str(tmp_path), "--stage2-steps", "6",
            "--stage1-steps", "4", "--seed", "0"]
    assert main(args) == 0
    results = json.loads((tmp_path / "data_selection.json").read_text())
    table = (tmp_path / "data_selection.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert set(results["summary"]) == {name for name, *_ in data_selection.RUNS}
    for name, run in results["summary"].items():
        assert name in table
        assert all(math.isfinite(run[k]) for k in ("loss_before", "loss_after", "device_s", "cpr"))
        assert run["device_s"] > 0 and (run["scored"] > 0) == ("influence data" in name or name.startswith("influence ×"))
    assert results["verdict"] in table and results["config"]["steps"] == 6
    assert main(["demo", "--data-selection", "--quick", "--out", str(tmp_path), "--stage2-steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err
    assert main(["demo", "--data-selection", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device does not apply to --data-selection" in capsys.readouterr().err
