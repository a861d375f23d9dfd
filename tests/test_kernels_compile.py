"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90), with no GPU needed.

The CPU tests run the kernels in Triton's interpreter, which accepts some programs the compiler
rejects; this builds the cubins the GPU would run and checks the PTX for correctly rounded
division and square root (Triton's default fp32 `/` and `sqrt` are approximate).
"""
import textwrap

import pytest

pytest.importorskip("triton", reason="the triton package is needed to compile its kernels")

from _utils import assert_script_prints_ok  # noqa: E402

SCRIPT = textwrap.dedent("""
    import importlib, inspect, re
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparse_grad.backends import triton_kernels

    package = triton_kernels().__name__
    norms = importlib.import_module(package + ".block_sqnorms")._block_sqnorms_kernel
    adamw = importlib.import_module(package + ".sparse_adamw")._sparse_adamw_kernel
    select = importlib.import_module(package + ".select_blocks")._select_kernel
    TABLES = {"block_tensor_ptr": "*i32", "out_ptr": "*fp32", "hparams_ptr": "*fp64",
              "grad_coef_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    SCALARS = {"block_size", "group", "num_blocks"}

    def compile_for(kernel, capability, constexprs):
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in constexprs else "i32" if n in SCALARS
                     else TABLES.get(n, "*i64") for n in names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(n),): v for n, v in constexprs.items()})
        return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})

    f32, f64, bf16, f16 = tl.float32, tl.float64, tl.bfloat16, tl.float16
    for capability in (80, 90):
        for dtype in (f32, bf16, f16, f64):
            compile_for(norms, capability, dict(DTYPE=dtype, ACC_DTYPE=f64 if dtype == f64 else f32,
                                                CHUNK=2048, NUM_CHUNKS=2))
        for param, grad, state in [(f32, f32, f32), (f32, bf16, f32), (bf16, bf16, bf16),
                                   (bf16, bf16, f32), (f16, f16, f16), (f64, f64, f64)]:
            for maximize, fused in ((False, False), (True, True)):  # fused: clip coef, found_inf, compact
                compiled = compile_for(adamw, capability, dict(
                    MAXIMIZE=maximize, HAS_GRAD_COEF=fused, HAS_FOUND_INF=fused, COMPACT=fused,
                    PARAM_DTYPE=param, GRAD_DTYPE=grad, STATE_DTYPE=state,
                    COMPUTE_DTYPE=f64 if param == f64 else f32, CHUNK=1024, NUM_CHUNKS=4))
                ptx = compiled.asm["ptx"]
                assert compiled.asm["cubin"], "no cubin"
                assert not re.search(r"div\\.(full|approx)|sqrt\\.approx", ptx), "approximate math in the update"
                if param != f64:
                    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
        for chunk in (1024, 4096):
            source = ASTSource(fn=select, constexprs={(4,): chunk}, signature={
                "scores_ptr": "*fp32", "out_ptr": "*i64", "table_ptr": "*i64", "num_segments": "i32",
                "CHUNK": "constexpr"})
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
            assert compiled.asm["cubin"], "no cubin"
    print("ok")
""")


def test_kernels_compile_for_sm80_and_sm90(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiler, not the interpreter
    assert_script_prints_ok(SCRIPT)
