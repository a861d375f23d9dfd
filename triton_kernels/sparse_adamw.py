"""AdamW, SGD and Lion on selected blocks only: one program per selected block, one launch per
dtype group. The update rule is a compile-time constant (``RULE``): each rule's kernel reads only
its own state and hyper-parameters (docs/design.md §3.4, §3.7)."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .tables import (TL_DTYPES, block_map, cached_tables, compute_dtype, element_offsets, group_by, launch_config,
                     vector_width)


@triton.jit
def _pow_int(base, exponent):
    """``base ** exponent`` for an int ``exponent >= 0`` by repeated squaring in fp64.

    Relative error < exponent * 2**-52: far below fp32 resolution of ``1 - base**exponent``.
    """
    result = base * 0.0 + 1.0
    while exponent > 0:
        if (exponent & 1) == 1:
            result = result * base
        base = base * base
        exponent = exponent >> 1
    return result


@triton.jit
def _sqrt(x):
    """Correctly rounded sqrt (tl.sqrt is approximate for fp32; fp64 sqrt is exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    """Correctly rounded division (fp32 `/` is approximate in Triton; fp64 `/` is exact)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """x -> DTYPE, rounding to nearest even.

    bf16 is rounded with integer ops exactly as c10::BFloat16 does (NaN -> 0x7FC0): the result
    equals the GPU's cvt.rn.bf16.f32, while Triton's interpreter would truncate.
    """
    if DTYPE == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _adamw_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, lanes, count, grad_coef, decay, lerp_coeff,
                 small_weight, beta2_c, one_minus_beta2, bias_correction2_sqrt, neg_step_size, eps,
                 MASKED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_COEF: tl.constexpr,
                 PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """One chunk of a block: ``lanes`` are element indices within the block, ``count`` the
    block's elements (``MASKED`` only: a full block needs no mask, so its accesses vectorize)."""
    if MASKED:
        mask = lanes < count
        param = tl.load(param_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        exp_avg = tl.load(exp_avg_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        param = tl.load(param_ptr + lanes).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes).to(COMPUTE_DTYPE)
        exp_avg = tl.load(exp_avg_ptr + lanes).to(COMPUTE_DTYPE)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + lanes).to(COMPUTE_DTYPE)
    if HAS_GRAD_COEF:
        grad = grad * grad_coef
    if MAXIMIZE:
        grad = -grad
    param = param * decay
    exp_avg = tl.fma(lerp_coeff, grad - exp_avg, tl.where(small_weight, exp_avg, grad))
    exp_avg_sq = exp_avg_sq * beta2_c
    exp_avg_sq = exp_avg_sq + one_minus_beta2 * grad * grad
    denom = _div(_sqrt(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param + _div(neg_step_size * exp_avg, denom)
    if MASKED:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE), mask=mask)
        tl.store(exp_avg_ptr + lanes, _round_to(exp_avg, STATE_DTYPE), mask=mask)
        tl.store(exp_avg_sq_ptr + lanes, _round_to(exp_avg_sq, STATE_DTYPE), mask=mask)
    else:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE))
        tl.store(exp_avg_ptr + lanes, _round_to(exp_avg, STATE_DTYPE))
        tl.store(exp_avg_sq_ptr + lanes, _round_to(exp_avg_sq, STATE_DTYPE))


ADAMW, SGD, LION = 0, 1, 2  # the RULE of a launch
_ADAMW, _SGD = tl.constexpr(ADAMW), tl.constexpr(SGD)  # the same, readable inside kernels


@triton.jit
def _other_block(hparams_ptr, grad_coef_ptr, step, param_base_ptr, grad_base_ptr, state_base_ptr, param_offsets_ptr,
                 grad_offsets_ptr, state_offsets_ptr, numels_ptr, t, local, pid, active, block_size,
                 MAXIMIZE: tl.constexpr, HAS_GRAD_COEF: tl.constexpr, COMPACT: tl.constexpr,
                 PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                 CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PARAM_VEC: tl.constexpr, GRAD_VEC: tl.constexpr,
                 STATE_VEC: tl.constexpr, RULE: tl.constexpr, NESTEROV: tl.constexpr, HAS_BUFFER: tl.constexpr):
    """One block of SGD or Lion: scalars from the fp64 table rounded once (as torch rounds a
    Python float alpha), then the block's chunks, unmasked when the block is full."""
    lr = tl.load(hparams_ptr + 0)
    h1 = tl.load(hparams_ptr + 1)
    h2 = tl.load(hparams_ptr + 2)
    h3 = tl.load(hparams_ptr + 3)
    neg_lr = (-lr).to(COMPUTE_DTYPE)
    grad_coef = neg_lr  # any value: read only if HAS_GRAD_COEF
    if HAS_GRAD_COEF:
        grad_coef = tl.load(grad_coef_ptr).to(COMPUTE_DTYPE)
    start = local * block_size
    param_first = tl.load(param_offsets_ptr + t) + start
    grad_first = tl.load(grad_offsets_ptr + t) + start
    if COMPACT:
        state_first = pid * block_size
    else:
        state_first = tl.load(state_offsets_ptr + t) + start
    if PARAM_VEC > 1:
        param_first = tl.multiple_of(param_first, PARAM_VEC)
    if GRAD_VEC > 1:
        grad_first = tl.multiple_of(grad_first, GRAD_VEC)
    if STATE_VEC > 1:
        state_first = tl.multiple_of(state_first, STATE_VEC)
    param_ptr = param_base_ptr + param_first
    grad_ptr = grad_base_ptr + grad_first
    state_ptr = state_base_ptr + state_first
    count = tl.minimum(start + block_size, tl.load(numels_ptr + t)) - start
    count = tl.where(active, count, 0)
    if RULE == _SGD:
        momentum = h1.to(COMPUTE_DTYPE)
        one_minus_dampening = (1.0 - h2).to(COMPUTE_DTYPE)
        weight_decay = h3.to(COMPUTE_DTYPE)
        decays = h3 != 0.0
        first = step == 1
        if count == NUM_CHUNKS * CHUNK:
            for chunk in range(NUM_CHUNKS):
                _sgd_chunk(param_ptr, grad_ptr, state_ptr, chunk * CHUNK + tl.arange(0, CHUNK), count, grad_coef,
                           neg_lr, momentum, one_minus_dampening, weight_decay, decays, first, False, MAXIMIZE,
                           HAS_GRAD_COEF, NESTEROV, HAS_BUFFER, PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)
        else:
            for chunk in range(NUM_CHUNKS):
                _sgd_chunk(param_ptr, grad_ptr, state_ptr, chunk * CHUNK + tl.arange(0, CHUNK), count, grad_coef,
                           neg_lr, momentum, one_minus_dampening, weight_decay, decays, first, True, MAXIMIZE,
                           HAS_GRAD_COEF, NESTEROV, HAS_BUFFER, PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)
    else:
        decay = (1.0 - lr * h3).to(COMPUTE_DTYPE)
        beta1 = h1.to(COMPUTE_DTYPE)
        one_minus_beta1 = (1.0 - h1).to(COMPUTE_DTYPE)
        beta2 = h2.to(COMPUTE_DTYPE)
        one_minus_beta2 = (1.0 - h2).to(COMPUTE_DTYPE)
        if count == NUM_CHUNKS * CHUNK:
            for chunk in range(NUM_CHUNKS):
                _lion_chunk(param_ptr, grad_ptr, state_ptr, chunk * CHUNK + tl.arange(0, CHUNK), count, grad_coef,
                            neg_lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, False, MAXIMIZE,
                            HAS_GRAD_COEF, PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)
        else:
            for chunk in range(NUM_CHUNKS):
                _lion_chunk(param_ptr, grad_ptr, state_ptr, chunk * CHUNK + tl.arange(0, CHUNK), count, grad_coef,
                            neg_lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, True, MAXIMIZE,
                            HAS_GRAD_COEF, PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)


@triton.jit
def _sgd_chunk(param_ptr, grad_ptr, buffer_ptr, lanes, count, grad_coef, neg_lr, momentum, one_minus_dampening,
               weight_decay, decays, first, MASKED: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_COEF: tl.constexpr, NESTEROV: tl.constexpr, HAS_BUFFER: tl.constexpr,
               PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """torch.optim.SGD on one chunk; each ``x.add(y, alpha=a)`` as torch's add kernel: fma(y, a, x)."""
    if MASKED:
        mask = lanes < count
        param = tl.load(param_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        param = tl.load(param_ptr + lanes).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes).to(COMPUTE_DTYPE)
    if HAS_GRAD_COEF:
        grad = grad * grad_coef
    if MAXIMIZE:
        grad = -grad
    grad = tl.where(decays, tl.fma(param, weight_decay, grad), grad)
    if HAS_BUFFER:
        if MASKED:
            buf = tl.load(buffer_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            buf = tl.load(buffer_ptr + lanes).to(COMPUTE_DTYPE)
        buf = tl.where(first, grad, tl.fma(grad, one_minus_dampening, buf * momentum))
        if MASKED:
            tl.store(buffer_ptr + lanes, _round_to(buf, STATE_DTYPE), mask=mask)
        else:
            tl.store(buffer_ptr + lanes, _round_to(buf, STATE_DTYPE))
        if NESTEROV:
            grad = tl.fma(buf, momentum, grad)
        else:
            grad = buf
    param = tl.fma(grad, neg_lr, param)
    if MASKED:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE), mask=mask)
    else:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE))


@triton.jit
def _lion_chunk(param_ptr, grad_ptr, exp_avg_ptr, lanes, count, grad_coef, neg_lr, decay, beta1, one_minus_beta1,
                beta2, one_minus_beta2, MASKED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_COEF: tl.constexpr,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Lion on one chunk, as lion-pytorch computes it with torch ops (sign(NaN) = 0, as torch.sign)."""
    if MASKED:
        mask = lanes < count
        param = tl.load(param_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        exp_avg = tl.load(exp_avg_ptr + lanes, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        param = tl.load(param_ptr + lanes).to(COMPUTE_DTYPE)
        grad = tl.load(grad_ptr + lanes).to(COMPUTE_DTYPE)
        exp_avg = tl.load(exp_avg_ptr + lanes).to(COMPUTE_DTYPE)
    if HAS_GRAD_COEF:
        grad = grad * grad_coef
    if MAXIMIZE:
        grad = -grad
    c = tl.fma(grad, one_minus_beta1, exp_avg * beta1)
    sign = (c > 0).to(COMPUTE_DTYPE) - (c < 0).to(COMPUTE_DTYPE)
    param = tl.fma(sign, neg_lr, param * decay)
    exp_avg = tl.fma(grad, one_minus_beta2, exp_avg * beta2)
    if MASKED:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE), mask=mask)
        tl.store(exp_avg_ptr + lanes, _round_to(exp_avg, STATE_DTYPE), mask=mask)
    else:
        tl.store(param_ptr + lanes, _round_to(param, PARAM_DTYPE))
        tl.store(exp_avg_ptr + lanes, _round_to(exp_avg, STATE_DTYPE))


@triton.jit
def _sparse_adamw_kernel(
    block_ids_ptr,  # int64 [num_selected]: global ids of the blocks to update
    hparams_ptr,  # fp64: AdamW [lr, beta1, beta2, eps, weight_decay]; SGD [lr, momentum, dampening,
    # weight_decay]; Lion [lr, beta1, beta2, weight_decay]
    grad_coef_ptr,  # fp32 [1]: grads are multiplied by it (read only if HAS_GRAD_COEF)
    found_inf_ptr,  # fp32 [1]: nonzero -> update nothing (read only if HAS_FOUND_INF)
    param_base_ptr,  # the first param, grad, exp_avg and exp_avg_sq of group `group` ...
    grad_base_ptr,
    exp_avg_base_ptr,
    exp_avg_sq_base_ptr,
    param_offsets_ptr,  # int64 [T] where each tensor starts, in elements from its base ...
    grad_offsets_ptr,
    exp_avg_offsets_ptr,
    exp_avg_sq_offsets_ptr,
    step_ptrs_ptr,  # int64 [T] base addresses of int32 per-block step counts
    numels_ptr,  # int64 [T]
    first_block_ptr,  # int64 [T]
    block_tensor_ptr,  # int32 [num_blocks]
    groups_ptr,  # int64 [T]: dtype group of each tensor; this launch handles `group`
    num_blocks,
    block_size,
    group,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    COMPACT: tl.constexpr,  # state is one slab: row pid of [num_ids, block_size], count pid
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # cdiv(block_size, CHUNK)
    PARAM_VEC: tl.constexpr,  # elements per 16 bytes where the host checked that every block of
    GRAD_VEC: tl.constexpr,  # every tensor of that kind starts on 16 bytes, else 1
    STATE_VEC: tl.constexpr,
    RULE: tl.constexpr = 0,  # ADAMW, SGD or LION; SGD and Lion keep their one state in exp_avg
    NESTEROV: tl.constexpr = False,  # SGD
    HAS_BUFFER: tl.constexpr = True,  # SGD: False without momentum (exp_avg is not read)
    COMPACT_GRADS: tl.constexpr = False,  # AdamW: grads are one slab, row pid of [num_ids, block_size]
):
    pid = tl.program_id(0).to(tl.int64)
    block = tl.load(block_ids_ptr + pid)
    valid = (block >= 0) & (block < num_blocks)  # an out-of-range id updates nothing
    block = tl.where(valid, block, 0)
    t = tl.load(block_tensor_ptr + block)
    active = valid & (tl.load(groups_ptr + t) == group)
    if HAS_FOUND_INF:  # an overflowed AMP step: not even the step count moves
        active = active & (tl.load(found_inf_ptr) == 0.0)
    local = block - tl.load(first_block_ptr + t)

    if COMPACT:
        step_ptr = tl.load(step_ptrs_ptr).to(tl.pointer_type(tl.int32)) + pid
    else:
        step_ptr = tl.load(step_ptrs_ptr + t).to(tl.pointer_type(tl.int32)) + local
    step = tl.load(step_ptr, mask=active, other=0) + 1
    tl.store(step_ptr, step, mask=active)

    # Scalars in fp64 then rounded once, as torch.optim.AdamW computes them on the host.
    if RULE != _ADAMW:
        _other_block(hparams_ptr, grad_coef_ptr, step, param_base_ptr, grad_base_ptr, exp_avg_base_ptr,
                     param_offsets_ptr, grad_offsets_ptr, exp_avg_offsets_ptr, numels_ptr, t, local, pid, active,
                     block_size, MAXIMIZE, HAS_GRAD_COEF, COMPACT, PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE, CHUNK,
                     NUM_CHUNKS, PARAM_VEC, GRAD_VEC, STATE_VEC, RULE, NESTEROV, HAS_BUFFER)
        return
    lr = tl.load(hparams_ptr + 0)
    beta1 = tl.load(hparams_ptr + 1)
    beta2 = tl.load(hparams_ptr + 2)
    eps = tl.load(hparams_ptr + 3).to(COMPUTE_DTYPE)
    weight_decay = tl.load(hparams_ptr + 4)
    neg_step_size = (-lr / (1.0 - _pow_int(beta1, step))).to(COMPUTE_DTYPE)
    bias_correction2_sqrt = _sqrt(1.0 - _pow_int(beta2, step)).to(COMPUTE_DTYPE)
    decay = (1.0 - lr * weight_decay).to(COMPUTE_DTYPE)
    beta2_c = beta2.to(COMPUTE_DTYPE)
    one_minus_beta2 = (1.0 - beta2).to(COMPUTE_DTYPE)
    # exp_avg.lerp_(grad, w) as torch computes it: fma(coeff, grad - exp_avg, base).
    weight = (1.0 - beta1).to(COMPUTE_DTYPE)
    small_weight = weight < 0.5
    lerp_coeff = tl.where(small_weight, weight, weight - 1.0)
    grad_coef = eps  # any value: read only if HAS_GRAD_COEF
    if HAS_GRAD_COEF:
        grad_coef = tl.load(grad_coef_ptr).to(COMPUTE_DTYPE)

    # Element offsets from pointer arguments, not addresses read from a table: the compiler
    # knows an argument's alignment (16 bytes when it is), never a loaded address's. Each first
    # element below is the block's, counted from the kind's base pointer.
    start = local * block_size
    param_first = tl.load(param_offsets_ptr + t) + start
    if COMPACT_GRADS:
        grad_first = pid * block_size
    else:
        grad_first = tl.load(grad_offsets_ptr + t) + start
    if COMPACT:  # row pid of the slabs
        exp_avg_first = pid * block_size
        exp_avg_sq_first = pid * block_size
    else:
        exp_avg_first = tl.load(exp_avg_offsets_ptr + t) + start
        exp_avg_sq_first = tl.load(exp_avg_sq_offsets_ptr + t) + start
    if PARAM_VEC > 1:
        param_first = tl.multiple_of(param_first, PARAM_VEC)
    if GRAD_VEC > 1:
        grad_first = tl.multiple_of(grad_first, GRAD_VEC)
    if STATE_VEC > 1:
        exp_avg_first = tl.multiple_of(exp_avg_first, STATE_VEC)
        exp_avg_sq_first = tl.multiple_of(exp_avg_sq_first, STATE_VEC)
    param_ptr = param_base_ptr + param_first
    grad_ptr = grad_base_ptr + grad_first
    exp_avg_ptr = exp_avg_base_ptr + exp_avg_first
    exp_avg_sq_ptr = exp_avg_sq_base_ptr + exp_avg_sq_first
    count = tl.minimum(start + block_size, tl.load(numels_ptr + t)) - start
    count = tl.where(active, count, 0)  # invalid id, or another launch's block: touch nothing
    if count == NUM_CHUNKS * CHUNK:  # a full block (CHUNK divides block_size): no mask
        for chunk in range(NUM_CHUNKS):
            _adamw_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, chunk * CHUNK + tl.arange(0, CHUNK),
                         count, grad_coef, decay, lerp_coeff, small_weight, beta2_c, one_minus_beta2,
                         bias_correction2_sqrt, neg_step_size, eps, False, MAXIMIZE, HAS_GRAD_COEF,
                         PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)
    else:  # a tensor's partial last block (or nothing to do): the same arithmetic, masked
        for chunk in range(NUM_CHUNKS):
            _adamw_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, chunk * CHUNK + tl.arange(0, CHUNK),
                         count, grad_coef, decay, lerp_coeff, small_weight, beta2_c, one_minus_beta2,
                         bias_correction2_sqrt, neg_step_size, eps, True, MAXIMIZE, HAS_GRAD_COEF,
                         PARAM_DTYPE, STATE_DTYPE, COMPUTE_DTYPE)


def launch_sparse_adamw(
    block_ids: torch.Tensor,
    hparams: torch.Tensor,
    bases: Sequence[torch.Tensor],
    tables: Sequence[torch.Tensor],
    numels: torch.Tensor,
    first_block: torch.Tensor,
    block_tensor: torch.Tensor,
    groups: torch.Tensor,
    num_blocks: int,
    block_size: int,
    group: int,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    maximize: bool,
    chunk: int | None = None,
    num_warps: int | None = None,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    vecs: tuple[int, int, int] = (1, 1, 1),
    rule: int = ADAMW,
    nesterov: bool = False,
    has_buffer: bool = True,
    compact_grads: bool = False,
) -> None:
    """Launch one program per id in ``block_ids``; ``rule``: ADAMW, SGD or LION (their state in
    exp_avg; ``has_buffer=False``: SGD without momentum, exp_avg not read).

    ``hparams`` is the fp64 table ``[lr, beta1, beta2, eps, weight_decay]`` on the device;
    ``bases`` the param, grad, exp_avg and exp_avg_sq that group ``group``'s element offsets
    count from; ``tables`` the int64 element-offset tables of params, grads, exp_avgs and
    exp_avg_sqs, then the address table of block_steps; ``dtypes`` the (param, grad, state)
    dtypes of the group; ``vecs`` its (param, grad, state) vector widths (see
    :func:`.tables.vector_width`). ``grad_coef`` and ``found_inf`` are optional one-element fp32
    tensors, read on device. ``compact_grads`` (AdamW): the grad base is one slab whose row ``i``
    is the gradient of ``block_ids[i]``.
    """
    param_dtype, grad_dtype, state_dtype = dtypes
    _sparse_adamw_kernel[(block_ids.numel(),)](
        block_ids, hparams,
        hparams if grad_coef is None else grad_coef,  # any pointer: the kernel does not read it
        hparams if found_inf is None else found_inf,
        *bases, *tables, numels, first_block, block_tensor, groups,
        num_blocks, block_size, group,
        MAXIMIZE=maximize,
        HAS_GRAD_COEF=grad_coef is not None,
        HAS_FOUND_INF=found_inf is not None,
        COMPACT=compact,
        PARAM_DTYPE=TL_DTYPES[param_dtype],
        GRAD_DTYPE=TL_DTYPES[grad_dtype],
        STATE_DTYPE=TL_DTYPES[state_dtype],
        COMPUTE_DTYPE=compute_dtype(param_dtype),
        PARAM_VEC=vecs[0], GRAD_VEC=vecs[1], STATE_VEC=vecs[2],
        RULE=rule, NESTEROV=nesterov, HAS_BUFFER=has_buffer, COMPACT_GRADS=compact_grads,
        # At most 16 bytes of param per thread and chunk (4 warps): 16-byte accesses for aligned
        # blocks, and few enough live values that fp32 fits in 64 registers (checked in
        # tests/test_kernels_compile.py). Elementwise: the chunk changes no result.
        **launch_config(block_size, block_ids.device, 128 * 16 // param_dtype.itemsize, chunk, num_warps),
    )


def sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    cache: dict | None = None,
    compact_grads: bool = False,
) -> None:
    """In-place AdamW on the blocks ``block_ids`` (global ids over ``params``); see the reference.

    ``cache``: a dict the caller keeps for as long as these tensors stay where they are; the
    pointer tables built on the first call are kept there, so later calls do no per-tensor work.
    """
    _update(ADAMW, params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size, maximize,
            grad_coef, found_inf, compact, cache, compact_grads=compact_grads)


def sparse_sgd_step(params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size, maximize, nesterov,
                    grad_coef=None, found_inf=None, compact=False, cache=None) -> None:
    """In-place SGD on the blocks ``block_ids``; see the reference backend. Without momentum
    (``momentum_buffers == []``) the kernel reads no buffer: the params stand in for it."""
    has_buffer = len(momentum_buffers) > 0
    buffers = list(momentum_buffers) if has_buffer else (params[:1] if compact else list(params))
    _update(SGD, params, grads, buffers, buffers, block_steps, block_ids, hyper, block_size, maximize,
            grad_coef, found_inf, compact, cache, nesterov, has_buffer)


def sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize,
                     grad_coef=None, found_inf=None, compact=False, cache=None) -> None:
    """In-place Lion on the blocks ``block_ids``; see the reference backend."""
    _update(LION, params, grads, exp_avgs, exp_avgs, block_steps, block_ids, hyper, block_size, maximize,
            grad_coef, found_inf, compact, cache)


def _update(rule, params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size, maximize,
            grad_coef, found_inf, compact, cache, nesterov=False, has_buffer=True, compact_grads=False) -> None:
    """One launch per dtype group of ``rule``'s kernel (SGD and Lion pass their one state list
    twice: the second is not read)."""
    if block_ids.numel() == 0 or not params:
        return
    key = ("sparse_adamw_step", rule, compact_grads)
    prepared = None if cache is None else cache.get(key)
    if prepared is None:
        prepared = _step_tables(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_size, compact,
                                compact_grads)
        if cache is not None:
            cache[key] = prepared
    bmap, tables, group_table, dtypes, bases, vecs = prepared
    kinds = (params, grads, exp_avgs, exp_avg_sqs)
    for g, group_dtypes in enumerate(dtypes):
        launch_sparse_adamw(block_ids, hyper, [kind[i] for kind, i in zip(kinds, bases[g])], tables, bmap.numels,
                            bmap.first_block, bmap.block_tensor, group_table, bmap.num_blocks, block_size, g,
                            group_dtypes, maximize, grad_coef=grad_coef, found_inf=found_inf, compact=compact,
                            vecs=vecs[g], rule=rule, nesterov=nesterov, has_buffer=has_buffer,
                            compact_grads=compact_grads)


def _step_tables(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_size: int, compact: bool,
                 compact_grads: bool = False):
    """The block map, the device offset tables, the dtype groups, each group's base tensors (as
    indices into params, grads, exp_avgs, exp_avg_sqs: a cache entry must not keep freed grads
    alive) and its (param, grad, state) vector widths."""
    device = params[0].device
    bmap = block_map(tuple(p.numel() for p in params), block_size, device)
    states = exp_avgs * len(params) if compact else exp_avgs  # a compact state's one slab serves all
    grads_of = grads * len(params) if compact_grads else grads  # so does a compact grad's
    groups, dtypes = group_by([(p.dtype, g.dtype, m.dtype) for p, g, m in zip(params, grads_of, states)])
    first = [groups.index(g) for g in range(len(dtypes))]
    # A slab (compact state or grads) is one tensor: base index 0, offsets unused (the kernel
    # reads rows by program id).
    one_slab = (False, compact_grads, compact, compact)
    bases = [tuple(0 if slab else i for slab in one_slab) for i in first]
    offsets = [(0,) * len(params) if slab else element_offsets(kind, [kind[bases[g][0]] for g in groups])
               for kind, slab in zip((params, grads, exp_avgs, exp_avg_sqs), one_slab)]
    *tables, group_table = cached_tables(
        tuple(offsets) + (tuple(x.data_ptr() for x in block_steps), tuple(groups)), device)
    vecs = []
    for g in range(len(dtypes)):
        members = [i for i, tg in enumerate(groups) if tg == g]
        states_of = ([exp_avgs[0], exp_avg_sqs[0]] if compact
                     else [exp_avgs[i] for i in members] + [exp_avg_sqs[i] for i in members])
        vecs.append((vector_width([params[i] for i in members], block_size),
                     vector_width(grads[:1] if compact_grads else [grads[i] for i in members], block_size),
                     vector_width(states_of, block_size)))
    return bmap, tables, group_table, dtypes, bases, vecs
