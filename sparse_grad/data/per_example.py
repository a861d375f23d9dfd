r"""Per-example gradient norms of selected parameter blocks, from one batched forward and backward.

For an example ``j`` with loss ``L_j`` and a selected block ``i`` of a parameter, the result is
``‖∂L_j/∂θ_i‖²`` (the sum of squares over the block's elements), for every example and every
selected block, without materializing the per-example gradients of whole parameters.

How each parameter is handled (its *route*):

``linear``      weight and bias of an ``nn.Linear`` (inputs ``[B, ..., in]``: every dim between the
                batch and the features is a token dim). Forward hooks keep the input ``a`` and the
                output; one ``torch.autograd.grad`` of ``Σ_j L_j`` gives the output gradients
                ``g`` (no parameter gradient is computed). Row ``r`` of example ``j``'s weight
                gradient is ``Σ_t g_t[r] a_t``. Rows lying wholly inside one selected block are
                reduced to their squared norms either by the *ghost* identity
                ``‖Σ_t g_t[r] a_t‖² = Σ_{t,s} (a_t·a_s) g_t[r] g_s[r]`` (cost ``B·T²·(in + rows)``)
                or *explicitly* (``B·T·rows·in``), whichever costs fewer multiply-adds for that
                layer; rows cut by a block boundary are formed explicitly and summed per element
                into their blocks. The bias gradient is ``Σ_t g_t``.
``embedding``   the weight of an ``nn.Embedding``: example ``j``'s gradient has at most ``T``
                nonzero rows (one per distinct token), so it is formed explicitly on those rows
                only (``B·T·dim``, less than the ghost form's ``B·T²·dim``); ``padding_idx`` rows
                get no gradient, as in ``F.embedding``'s backward.
``layernorm``   weight and bias of an ``nn.LayerNorm``: ``Σ_t g_t ⊙ x̂_t`` and ``Σ_t g_t`` with
                ``x̂`` recomputed from the saved input.
``torch.func``  anything else (learned position tables, other norms, custom modules, parameters
                shared by several modules or used without calling their module):
                ``torch.func.vmap(torch.func.grad(...))`` over the examples, for those
                parameters only. **Cost**: one more vmapped forward and backward of the whole
                batch (about as much as the hooked pass itself), paid only when a selected
                block lies in such a parameter.

A module called several times in one forward contributes all its calls (their tokens are
concatenated, so the sums above run over all of them).

Requirements (checked where possible): examples are independent (dim 0 of every hooked layer's
input is the example; no BatchNorm in training mode, which mixes examples), ``per_example_loss``
returns one loss per example, and a hooked module's output is not modified in place. Results are
accumulated in fp32 (fp64 for fp64 parameters).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .. import _checks
from .blocks import ParamBlocks

__all__ = ["LINEAR_METHODS", "PerExampleNorms", "batch_size_of", "split_batch"]

LINEAR_METHODS = ("auto", "ghost", "explicit")
ROUTES = ("linear", "embedding", "layernorm", "torch.func")
_CHUNK_ELEMENTS = 1 << 24  # explicit per-example rows are formed at most this many values at a time


def batch_size_of(batch) -> int:
    """The number of examples in ``batch`` (a tensor or a nest of tensors, examples along dim 0)."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError("batch must be a tensor or a tuple/list/dict of tensors with the examples along dim 0")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every tensor of batch needs the same leading (example) dim, got shapes "
                         f"{[tuple(t.shape) for t in leaves]}")
    return sizes.pop()


def split_batch(batch, index: torch.Tensor):
    """The examples ``index`` of ``batch`` (every tensor indexed along dim 0)."""
    return tree_map(lambda t: t[index.to(t.device)] if isinstance(t, torch.Tensor) else t, batch)


def _cat_tokens(parts: list[torch.Tensor], dims: int) -> torch.Tensor:
    """The calls of one module joined along the token dim: each ``[B, ..., *features]`` part as
    ``[B, T, *features]`` (``dims`` trailing feature dims), concatenated (no copy for one call)."""
    parts = [x.reshape(x.shape[0], -1, *x.shape[x.dim() - dims:]) if dims else x.reshape(x.shape[0], -1)
             for x in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@dataclass
class _Record:
    """What the forward hooks kept of one module: its inputs and outputs, call by call."""

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    versions: list = field(default_factory=list)


@dataclass
class _Target:
    """Where one parameter's per-block sums go: ``pos[b]`` is block ``b``'s column in the result
    (``dummy`` for blocks not selected)."""

    blocks: ParamBlocks
    pos: torch.Tensor  # int64 [num_blocks] on the device
    dummy: int

    @classmethod
    def of(cls, blocks: ParamBlocks, first_column: int, dummy: int, device) -> _Target:
        n = (blocks.param.numel() + blocks.block_size - 1) // blocks.block_size
        pos = torch.full((n,), dummy, dtype=torch.int64)
        pos[blocks.block_ids] = torch.arange(blocks.block_ids.numel()) + first_column
        return cls(blocks, pos.to(device), dummy)


class PerExampleNorms:
    """Per-example squared gradient norms of selected blocks of ``model``'s parameters.

    Args:
        model: the model; its parameters are never written.
        per_example_loss: ``per_example_loss(model, batch) -> Tensor [B]``, one loss per example
            (e.g. the mean token loss of each sequence).
        linear_method: ``"auto"`` (per layer, whichever of ghost and explicit costs fewer
            multiply-adds), ``"ghost"`` or ``"explicit"`` (for tests and measurements).

    Raises ``ValueError`` for models it cannot handle: no ``nn.Linear`` or ``nn.Embedding`` at
    all (nothing to hook: use ``torch.func`` directly), BatchNorm in training mode, an
    ``nn.Embedding`` with ``max_norm`` (its forward writes the weight) or
    ``scale_grad_by_freq`` (the gradient depends on the other examples' tokens).
    """

    def __init__(self, model: nn.Module, per_example_loss: Callable, *, linear_method: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(per_example_loss):
            raise TypeError(f"per_example_loss must be callable, got {type(per_example_loss).__name__}")
        self.linear_method = _checks.choice(linear_method, LINEAR_METHODS, "linear_method")
        self.model = model
        self.per_example_loss = per_example_loss
        modules = dict(model.named_modules())
        if not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in modules.values()):
            raise ValueError(f"model ({type(model).__name__}) has no nn.Linear or nn.Embedding layer: per-example "
                             "norms here come from hooks on those layers; for other models use torch.func "
                             "per-example gradients directly")
        for name, m in modules.items():
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
                option = "max_norm (its forward renormalizes the weight in place)" if m.max_norm is not None \
                    else "scale_grad_by_freq (its gradient depends on the other examples' tokens)"
                raise ValueError(f"module {name!r} is an nn.Embedding with {option}: not supported")
        self._owners = self._route_params(modules)
        self.routes: dict[str, str] = {}  # parameter name -> route, for every trainable parameter
        for name, p in model.named_parameters():
            owner = self._owners.get(id(p))
            self.routes[name] = "torch.func" if owner is None else owner[0]
        self.last_methods: dict[str, str] = {}  # parameter name -> how the last call computed it
        self._recording = False

    @staticmethod
    def _route_params(modules: dict[str, nn.Module]) -> dict[int, tuple[str, nn.Module, str]]:
        """``id(param) -> (route, module, attribute)`` for the params a hook can handle: owned by
        exactly one supported module (a param shared by several goes to torch.func)."""
        owners: dict[int, list] = {}
        for m in modules.values():
            for attr, p in m.named_parameters(recurse=False):
                route = ("linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding)
                         else "layernorm" if isinstance(m, nn.LayerNorm) else "torch.func")
                owners.setdefault(id(p), []).append((route, m, attr))
        return {k: v[0] for k, v in owners.items() if len(v) == 1 and v[0][0] != "torch.func"}

    def _check_mode(self) -> None:
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(f"module {name!r} is a BatchNorm in training mode: it mixes the examples of a "
                                 "batch, so per-example gradients are undefined (call model.eval() or use a "
                                 "per-example norm such as LayerNorm/GroupNorm)")

    def block_sqnorms(self, batch, blocks: list[ParamBlocks]) -> torch.Tensor:
        """``[B, n]``: ``‖∂L_j/∂θ_i‖²`` for every example ``j`` of ``batch`` and every selected
        block ``i`` of ``blocks`` (columns: the blocks of ``blocks[0]`` in ascending id order, then
        those of ``blocks[1]``, ...). fp32, or fp64 when every selected parameter is fp64."""
        self._check_mode()
        blocks = [b for b in blocks if b.block_ids.numel()]
        for b in blocks:
            if self.routes.get(b.name) is None:
                raise ValueError(f"{b.name!r} is not a parameter of the model")
        B = batch_size_of(batch)
        device = next(iter(self.model.parameters())).device
        n = sum(b.block_ids.numel() for b in blocks)
        dtype = torch.float64 if blocks and all(b.param.dtype == torch.float64 for b in blocks) else torch.float32
        out = torch.zeros(B, n + 1, dtype=dtype, device=device)  # the last column takes unselected elements
        targets, column = [], 0
        for b in blocks:
            targets.append(_Target.of(b, column, n, device))
            column += b.block_ids.numel()
        self.last_methods = {}
        hooked = [t for t in targets if id(t.blocks.param) in self._owners]
        records = self._hooked_pass(batch, B, hooked) if hooked else {}
        fallback = [t for t in targets if id(t.blocks.param) not in self._owners
                    or not records.get(self._owners[id(t.blocks.param)][1])]
        for t in hooked:
            route, module, attr = self._owners[id(t.blocks.param)]
            record = records.get(module)
            if record:  # a module that never ran in this forward goes to torch.func below
                self._add_hooked(out, t, route, module, attr, record)
        if fallback:
            self._add_torch_func(out, batch, fallback)
        return out[:, :n]

    # -- the hooked pass -------------------------------------------------------------------------

    def _hooked_pass(self, batch, B: int, targets: list[_Target]) -> dict[nn.Module, tuple]:
        """One forward with hooks on the modules owning ``targets``' params and one
        ``autograd.grad`` to their outputs: ``{module: (inputs [B, T, ...], output grads)}``."""
        modules = {self._owners[id(t.blocks.param)][1] for t in targets}
        records = {m: _Record() for m in modules}

        def keep(module, args, kwargs, output):
            if not self._recording:
                return
            record = records[module]
            record.inputs.append((args[0] if args else kwargs["input"]).detach())
            record.outputs.append(output)
            record.versions.append(output._version)

        handles = [m.register_forward_hook(keep, with_kwargs=True) for m in modules]
        self._recording = True
        try:
            with torch.enable_grad():
                losses = self.per_example_loss(self.model, batch)
                total = losses.sum() if isinstance(losses, torch.Tensor) else None
        finally:
            self._recording = False
            for h in handles:
                h.remove()
        if not isinstance(losses, torch.Tensor) or losses.shape != (B,) or not losses.is_floating_point():
            raise ValueError(f"per_example_loss must return one floating loss per example, a tensor of shape ({B},); "
                             f"got {getattr(losses, 'dtype', type(losses).__name__)} "
                             f"{tuple(getattr(losses, 'shape', ()))}")
        names = {m: n for n, m in self.model.named_modules()}
        outputs = []
        for m, record in records.items():
            for out, version in zip(record.outputs, record.versions):
                if out._version != version:
                    raise ValueError(f"the output of module {names[m]!r} was modified in place after it returned "
                                     "(e.g. by an inplace activation): per-example norms need it unchanged")
                if out.shape[0] != B:
                    raise ValueError(f"module {names[m]!r} returned a leading dim of {out.shape[0]} for a batch of "
                                     f"{B} examples: the examples must stay along dim 0 of every hooked layer")
                outputs.append(out)
        if not outputs or not total.requires_grad:
            return {}
        grads = iter(torch.autograd.grad(total, outputs, allow_unused=True))
        found = {}
        for m, record in records.items():
            gs = [next(grads) for _ in record.outputs]
            if not gs:
                continue
            gs = [torch.zeros_like(o) if g is None else g for g, o in zip(gs, record.outputs)]
            found[m] = (record.inputs, gs)
        return found

    def _add_hooked(self, out, target: _Target, route: str, module: nn.Module, attr: str, record) -> None:
        p = target.blocks.param
        dtype = _acc_dtype(p)
        inputs, grads = record
        if route == "embedding":
            tokens = _cat_tokens(inputs, 0)
            g = _cat_tokens(grads, 1).to(dtype)
            self.last_methods[target.blocks.name] = "embedding"
            _embedding_rows(out, target, tokens, g, module.padding_idx)
            return
        if route == "layernorm":
            shape = module.normalized_shape
            g = _cat_tokens(grads, len(shape)).flatten(2).to(dtype)
            self.last_methods[target.blocks.name] = "layernorm"
            if attr == "bias":
                _vector_into(out, target, g.sum(1))
                return
            xhat = _cat_tokens([F.layer_norm(x.to(dtype), shape, None, None, module.eps) for x in inputs],
                               len(shape)).flatten(2)
            _vector_into(out, target, (g * xhat).sum(1))
            return
        g = _cat_tokens(grads, 1).to(dtype)
        if attr == "bias":
            self.last_methods[target.blocks.name] = "explicit"
            _vector_into(out, target, g.sum(1))
            return
        a = _cat_tokens(inputs, 1).to(dtype)
        self.last_methods[target.blocks.name] = _linear_rows(out, target, a, g, self.linear_method)

    # -- the fallback ----------------------------------------------------------------------------

    def _add_torch_func(self, out, batch, targets: list[_Target]) -> None:
        """Exact per-example gradients of ``targets``' params by vmap over grad (see module doc)."""
        from torch.func import functional_call, grad, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = [t.blocks.name for t in targets]
        params = {n: t.blocks.param.detach() for n, t in zip(names, targets)}
        model, loss = self.model, self.per_example_loss

        def one(p, example):
            single = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
            return functional_call(_LossModule(model, loss), {f"model.{n}": v for n, v in p.items()},
                                   (single,), strict=False).sum()

        # SDPA's fused CPU/GPU kernels have no vmap batching rule (vmap would loop over the
        # examples); its math form is plain batched matmuls and softmax. Outside no_grad, the
        # result would hang on the graph of the model's other parameters.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            grads = vmap(grad(one), in_dims=(None, 0), randomness="different")(params, batch)
        for n, t in zip(names, targets):
            self.last_methods[n] = "torch.func"
            _vector_into(out, t, grads[n].reshape(grads[n].shape[0], -1).to(_acc_dtype(t.blocks.param)))


class _LossModule(nn.Module):
    """``per_example_loss(model, batch)`` as a module, so ``functional_call`` can swap the
    model's parameters for the vmapped ones while the loss sees the real model object."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch):
        return self.loss(self.model, batch)


# -- reductions into blocks -------------------------------------------------------------------------

def _scatter(out: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> None:
    """``out[:, columns[k]] += values[:, k]`` for a ``[B, m]`` ``values``."""
    out.index_add_(1, columns, values.to(out.dtype))


def _vector_into(out, target: _Target, grad: torch.Tensor) -> None:
    """Per-example gradients of a whole tensor, ``[B, numel]``, squared and summed per block."""
    size = target.blocks.block_size
    columns = target.pos[torch.arange(grad.shape[1], device=grad.device) // size]
    _scatter(out, columns, grad.square())


def _rows_of(target: _Target, rows: int, cols: int):
    """For a ``[rows, cols]`` weight: the rows lying wholly inside one selected block (and that
    block's column) and the rows that touch a selected block only in part."""
    size, device = target.blocks.block_size, target.pos.device
    r = torch.arange(rows, device=device)
    first, last = r * cols // size, (r * cols + cols - 1) // size
    selected = target.pos != target.dummy
    full = (first == last) & selected[first]
    before = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(selected.long(), 0)])
    touched = before[last + 1] - before[first] > 0
    full_rows = torch.nonzero(full).flatten()
    return full_rows, target.pos[first[full_rows]], torch.nonzero(touched & ~full).flatten()


def _element_columns(target: _Target, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """The result column of every element of ``rows`` of a ``[*, cols]`` weight, ``[len(rows) · cols]``."""
    flat = rows[:, None] * cols + torch.arange(cols, device=rows.device)
    return target.pos[(flat // target.blocks.block_size).flatten()]


def _columns_of(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``g[..., rows]``, without a copy when ``rows`` are all of them in order."""
    if rows.numel() == g.shape[-1]:  # rows are ascending and unique: all of them
        return g
    return g[..., rows]


def _explicit_rows(a: torch.Tensor, g: torch.Tensor, rows: torch.Tensor):
    """Per-example weight-gradient rows ``Σ_t g_t[r] a_t`` for ``rows``, in chunks of rows:
    yields ``(chunk of rows' positions, [B, chunk, in])``."""
    B, _, cols = a.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, B * cols))
    if step >= rows.numel():
        yield slice(0, rows.numel()), torch.bmm(_columns_of(g, rows).transpose(1, 2), a)
        return
    for start in range(0, rows.numel(), step):
        chunk = rows[start:start + step]
        yield slice(start, start + chunk.numel()), torch.bmm(g[:, :, chunk].transpose(1, 2), a)


def _add_partial_rows(out, target: _Target, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Add the squares of per-example rows ``values [B, len(rows), cols]`` to their blocks. When
    whole blocks tile each row (``cols`` a multiple of the block size, the usual powers of two),
    each block's elements are summed first, so only one value per block is scattered."""
    B, n, cols = values.shape
    size = target.blocks.block_size
    if cols % size == 0:
        first = rows * (cols // size)
        blocks = first[:, None] + torch.arange(cols // size, device=rows.device)
        _scatter(out, target.pos[blocks.flatten()], values.square().view(B, n * (cols // size), size).sum(-1))
        return
    _scatter(out, _element_columns(target, rows, cols), values.reshape(B, -1).square())


def _linear_rows(out, target: _Target, a: torch.Tensor, g: torch.Tensor, method: str) -> str:
    """Add a Linear weight's selected blocks; returns the method used for its whole rows."""
    T, cols = a.shape[1:]
    full_rows, full_cols, partial_rows = _rows_of(target, g.shape[-1], cols)
    nf = full_rows.numel()
    if method == "auto":
        ghost_cost = T * T * (cols + nf) + T * nf
        explicit_cost = T * nf * cols + nf * cols
        method = "ghost" if ghost_cost < explicit_cost else "explicit"
    if nf:
        if method == "ghost":
            gf = _columns_of(g, full_rows)
            gram = torch.bmm(a, a.transpose(1, 2))               # a_t · a_s, [B, T, T]
            sq = (gf * torch.bmm(gram, gf)).sum(1)               # Σ_{t,s} (a_t·a_s) g_t[r] g_s[r]
            _scatter(out, full_cols, sq)
        else:
            for part, rows in _explicit_rows(a, g, full_rows):
                _scatter(out, full_cols[part], rows.square().sum(-1))
    if partial_rows.numel():
        for part, rows in _explicit_rows(a, g, partial_rows):
            _add_partial_rows(out, target, partial_rows[part], rows)
    return method


def _embedding_rows(out, target: _Target, tokens: torch.Tensor, g: torch.Tensor, padding_idx) -> None:
    """Add an Embedding weight's selected blocks: per example, the summed output gradients of
    each distinct token whose row touches a selected block."""
    B, _, dim = g.shape
    full_rows, _, partial_rows = _rows_of(target, target.blocks.param.shape[0], dim)
    touched = torch.zeros(target.blocks.param.shape[0], dtype=torch.bool, device=g.device)
    touched[full_rows] = True
    touched[partial_rows] = True
    keep = touched[tokens]
    if padding_idx is not None:
        keep &= tokens != padding_idx
    example = torch.arange(B, device=g.device)[:, None].expand_as(tokens)
    vocab = target.blocks.param.shape[0]
    keys = (example * vocab + tokens)[keep]
    if keys.numel() == 0:
        return
    pairs, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(pairs.numel(), dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, g[keep])
    owner, row = pairs // vocab, pairs % vocab
    squares, size = summed.square(), target.blocks.block_size
    # One value per (example, block) where blocks tile the rows or rows tile the blocks.
    if dim % size == 0:
        values = squares.view(-1, dim // size, size).sum(-1)
        blocks = row[:, None] * (dim // size) + torch.arange(dim // size, device=row.device)
    elif size % dim == 0:
        values, blocks = squares.sum(-1, keepdim=True), (row * dim // size)[:, None]
    else:
        values, blocks = squares, (row[:, None] * dim + torch.arange(dim, device=row.device)) // size
    width = out.shape[1]
    out.view(-1).index_add_(0, (owner[:, None] * width + target.pos[blocks]).flatten(), values.flatten().to(out.dtype))
