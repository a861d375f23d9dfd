"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90), with no GPU needed.

The CPU tests run the kernels in Triton's interpreter, which accepts some programs the compiler
rejects; this builds the cubins the GPU would run and checks the PTX for correctly rounded
division and square root (Triton's default fp32 `/` and `sqrt` are approximate), and the
selection kernels' cubins for what a GPU would launch (the update for AdamW, SGD and Lion): no register spills, at most 128 registers
per thread at the GPU's tile size, and histogram atomics that are relaxed integer adds (and,
with Triton 3.9, which emits a reduction for an add whose old value is unused, never a
returning atomic). It passes with Triton 3.6 (the GPU machine's) and 3.9 (CI's).
"""
import textwrap

import pytest

pytest.importorskip("triton", reason="the triton package is needed to compile its kernels")

from _utils import assert_script_prints_ok  # noqa: E402

SCRIPT = textwrap.dedent("""
    import importlib, inspect, os, re, subprocess, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparse_grad.backends import triton_kernels

    package = triton_kernels().__name__
    norms = importlib.import_module(package + ".block_sqnorms")._block_sqnorms_kernel
    adamw = importlib.import_module(package + ".sparse_adamw")._sparse_adamw_kernel
    select = importlib.import_module(package + ".select_blocks")
    TABLES = {"block_tensor_ptr": "*i32", "out_ptr": "*fp32", "hparams_ptr": "*fp64",
              "grad_coef_ptr": "*fp32", "found_inf_ptr": "*fp32", "scores_ptr": "*fp32", "hist_ptr": "*i32",
              "scratch_ptr": "*i32"}
    SCALARS = {"block_size", "group", "num_blocks", "num_tiles", "num_segments", "sparse_keys"}
    # Shipped with Triton, next to the ptxas that built the cubins.
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    POINTEE = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float64: "*fp64"}

    def compile_for(kernel, capability, constexprs, num_warps=8, typed=()):
        # typed: (argument, constexpr naming its pointee dtype). Pointer arguments get the
        # 16-byte divisibility the launcher specializes on for aligned tensors (all of them here).
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in constexprs else "i32" if n in SCALARS
                     else TABLES.get(n, "*i64") for n in names}
        for name, dtype_name in typed:
            signature[name] = POINTEE[constexprs[dtype_name]]
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
        source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                           constexprs={(names.index(n),): v for n, v in constexprs.items()})
        return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})

    # Global atomics: relaxed integer adds only, and where the compiler can say so (Triton 3.9
    # emits `red` for an add whose old value is unused; 3.6 emits `atom` for it all the same),
    # none that returns a value.
    RETURNS_ONLY_WHEN_USED = tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9)

    def global_atomics(ptx, what):
        found = re.findall(r"\\b((?:red|atom)\\.global[.a-z0-9]*)", ptx)
        for op in found:
            assert re.fullmatch(r"(red|atom)\\.global\\.gpu\\.relaxed\\.add\\.[us]32", op), (op, what)
            assert not (RETURNS_ONLY_WHEN_USED and op.startswith("atom")), ("a returning global atomic", op, what)
        return found

    # (registers per thread, local memory bytes) of a cubin, as ptxas allotted them: the
    # compiled kernel's own n_regs is only filled in when a GPU driver loads it.
    def resources(compiled):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        return int(re.search(r"REG:(\\d+)", usage).group(1)), int(re.search(r"LOCAL:(\\d+)", usage).group(1))

    f32, f64, bf16, f16 = tl.float32, tl.float64, tl.bfloat16, tl.float16
    for capability in (80, 90):
        for dtype in (f32, bf16, f16, f64):
            for vec in (1, 128 // dtype.primitive_bitwidth):  # scalar, or 16 bytes
                # Without the selection's first pass, and with it over one segment or per tensor.
                for first_pass in ((0, 1, 2) if vec > 1 else (0,)):
                    compiled = compile_for(norms, capability, dict(
                        DTYPE=dtype, ACC_DTYPE=f64 if dtype == f64 else f32, CHUNK=2048, NUM_CHUNKS=2, VEC=vec,
                        FIRST_PASS=first_pass, BINS=select.BINS), typed=[("base_ptr", "DTYPE")])
                    ptx = compiled.asm["ptx"]
                    assert resources(compiled)[1] == 0, "the norm pass spills"
                    # One relaxed reduction per block into the histogram, never a returning atomic.
                    assert bool(global_atomics(ptx, ("norms", dtype, vec, first_pass))) == (first_pass > 0)
                    # Aligned tensors: the full-block loop loads 16 bytes per instruction; with an
                    # unaligned view in the group (vec 1) it must not claim to.
                    assert bool(re.search(r"ld\\.global\\.(v4\\.b32|v2\\.b64)", ptx)) == (vec > 1), (dtype, vec)
        for param, grad, state in [(f32, f32, f32), (f32, bf16, f32), (bf16, bf16, bf16),
                                   (bf16, bf16, f32), (f16, f16, f16), (f64, f64, f64)]:
            vecs = tuple(128 // d.primitive_bitwidth for d in (param, grad, state))
            chunk = 128 * 128 // param.primitive_bitwidth  # launch_sparse_adamw's: 16 bytes of param per thread
            for maximize, fused, vec in ((False, False, (1, 1, 1)), (False, False, vecs), (True, True, vecs)):
                # fused: clip coef, found_inf, compact
                compiled = compile_for(adamw, capability, dict(
                    MAXIMIZE=maximize, HAS_GRAD_COEF=fused, HAS_FOUND_INF=fused, COMPACT=fused,
                    PARAM_DTYPE=param, GRAD_DTYPE=grad, STATE_DTYPE=state,
                    COMPUTE_DTYPE=f64 if param == f64 else f32, CHUNK=chunk, NUM_CHUNKS=4096 // chunk,
                    PARAM_VEC=vec[0], GRAD_VEC=vec[1], STATE_VEC=vec[2], RULE=0, NESTEROV=False, HAS_BUFFER=True),
                    num_warps=4,  # as launch_config gives for such a chunk
                    typed=[("param_base_ptr", "PARAM_DTYPE"), ("grad_base_ptr", "GRAD_DTYPE"),
                           ("exp_avg_base_ptr", "STATE_DTYPE"), ("exp_avg_sq_base_ptr", "STATE_DTYPE")])
                ptx = compiled.asm["ptx"]
                regs, local = resources(compiled)
                assert not re.search(r"div\\.(full|approx)|sqrt\\.approx", ptx), "approximate math in the update"
                if param != f64:
                    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
                assert local == 0, "the update spills"
                if param == f32:  # the target for fp32 params
                    assert regs <= 64, f"the update uses {regs} registers ({param}, {grad}, {state}, {vec})"
                # Full blocks of aligned tensors: 16-byte loads and stores; scalar otherwise.
                wide = r"global\\.(v4\\.b32|v2\\.b64)"
                assert bool(re.search(r"ld\\." + wide, ptx)) == (vec != (1, 1, 1)), (param, grad, state, vec)
                assert bool(re.search(r"st\\." + wide, ptx)) == (vec != (1, 1, 1)), (param, grad, state, vec)
        # SGD (no buffer, heavy ball, Nesterov) and Lion: the same kernel with RULE set. Same
        # targets as AdamW's; each rule reads only its own state (the exp_avg_sq stream is dead).
        for param, grad, state in [(f32, f32, f32), (bf16, bf16, f32), (f64, f64, f64)]:
            vecs = tuple(128 // d.primitive_bitwidth for d in (param, grad, state))
            chunk = 128 * 128 // param.primitive_bitwidth
            for rule, nesterov, has_buffer in ((1, False, False), (1, False, True), (1, True, True), (2, False, True)):
                for vec in ((vecs,) if param != f32 or rule == 1 and has_buffer else ((1, 1, 1), vecs)):
                    compiled = compile_for(adamw, capability, dict(
                        MAXIMIZE=True, HAS_GRAD_COEF=True, HAS_FOUND_INF=True, COMPACT=False,
                        PARAM_DTYPE=param, GRAD_DTYPE=grad, STATE_DTYPE=state,
                        COMPUTE_DTYPE=f64 if param == f64 else f32, CHUNK=chunk, NUM_CHUNKS=4096 // chunk,
                        PARAM_VEC=vec[0], GRAD_VEC=vec[1], STATE_VEC=vec[2],
                        RULE=rule, NESTEROV=nesterov, HAS_BUFFER=has_buffer),
                        num_warps=4,
                        typed=[("param_base_ptr", "PARAM_DTYPE"), ("grad_base_ptr", "GRAD_DTYPE"),
                               ("exp_avg_base_ptr", "STATE_DTYPE"), ("exp_avg_sq_base_ptr", "STATE_DTYPE")])
                    ptx = compiled.asm["ptx"]
                    regs, local = resources(compiled)
                    what = (rule, nesterov, has_buffer, param, grad, state, vec)
                    # Neither rule divides or takes a root: none of AdamW's scalar work is left in.
                    assert not re.search(r"(div|sqrt)\\.[a-z.]*f(32|64)", ptx), f"float division or sqrt: {what}"
                    assert local == 0, f"spills: {what}"
                    if param == f32:
                        assert regs <= 64, f"{regs} registers: {what}"
                    if param != f64:  # torch's add(alpha=...) as one correctly rounded fma
                        assert "fma.rn.f32" in ptx, what
                    wide = r"global\\.(v4\\.b32|v2\\.b64)"
                    assert bool(re.search(r"ld\\." + wide, ptx)) == (vec != (1, 1, 1)), what
                    assert bool(re.search(r"st\\." + wide, ptx)) == (vec != (1, 1, 1)), what
        common = dict(BINS=select.BINS, ROW_CAP=select.ROW_CAP)
        # The smallest tile, the GPU's tiles at 98,688 and 1M scores, the largest.
        for tile, warps in ((16, 4), (1024, 4), (4096, 8), (select.MAX_TILE, 8)):
            sub = min(tile, select.GPU_HISTOGRAM_KEYS_PER_THREAD * 32 * warps)  # what plan() gives on a GPU
            kernels = [(select._histogram_kernel, dict(P=p, BLOCK=tile, SUB=sub, **common)) for p in range(3)]
            kernels += [(select._compact_kernel, dict(BLOCK=tile, FOLDED=folded, CHUNK=chunk, NUM_PASSES=3, **common))
                        for folded, chunk in ((True, select.FOLD_CHUNK), (False, 1024))]
            for kernel, constexprs in kernels:
                compiled = compile_for(kernel, capability, constexprs, warps)
                regs, local = resources(compiled)
                what = (kernel.fn.__name__, tile, constexprs.get("P"), constexprs.get("FOLDED"))
                assert local == 0, f"spills: {what}"
                if tile <= 4096:  # what a GPU launches: 8 warps of at most 128 registers each
                    assert regs <= 128, f"{regs} registers: {what}"
                ptx = compiled.asm["ptx"]
                # Histogram atomics: relaxed adds to global memory (one per bin of a tile's
                # shared-memory histogram, or one per candidate key where a tile has few).
                assert bool(global_atomics(ptx, what)) == (kernel is select._histogram_kernel), what
        compiled = compile_for(select._scan_kernel, capability, dict(CHUNK=1024, NUM_PASSES=3, **common), 4)
        assert resources(compiled)[1] == 0, "the scan spills"
    print("ok")
""")


def test_kernels_compile_for_sm80_and_sm90(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiler, not the interpreter
    assert_script_prints_ok(SCRIPT)
