#!/usr/bin/env bash
# One lent-GPU session: build with CUDA, correctness on CUDA first, then the per-op timings.
# Every stage has its own time limit and log under $OUT, so a slow stage costs only itself.
# Usage (on the GPU machine, repository root): OUT=/some/dir bash benchmarks/gpu_session.sh [STAGES]
# STAGES: a comma-separated subset of build,cuda_tests,cuda_all,gpu_ops,bench,sgd_lion_bench,end_to_end,
# end_to_end_gpt2 (default: all but cuda_tests, bench and end_to_end_gpt2).
set -u
OUT=${OUT:-gpu_out}
STAGES=,${1:-build,cuda_all,gpu_ops,sgd_lion_bench,end_to_end},
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 SPARSE_GRAD_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1 MAX_JOBS=16
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    case $STAGES in *,$name,*) ;; *) return ;; esac
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "stage $name: rc=$rc in $((SECONDS - t0)) s  | $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  lscpu | grep "Model name"; git log -1 --format='commit %h %s' 2>/dev/null
} >> "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
stage build 170 python3 -m pip install --no-build-isolation --no-deps -e .
P="python3 -m pytest -q -p no:cacheprovider -p no:logging --timeout 90 -n 8"
# The kernels and the step on CUDA (both GPU backends), against the reference backend.
stage cuda_tests 110 $P -k cuda tests/test_block_sqnorms.py tests/test_select_blocks.py tests/test_triton_select.py \
    tests/test_sparse_adamw_step.py tests/test_sparse_adamw.py tests/test_cuda_step.py tests/test_launch_count.py \
    tests/test_kernel_numerics.py tests/test_compact_state.py tests/test_native.py tests/test_compiled_step.py \
    tests/test_sparse_sgd_lion.py tests/test_sparse_backward.py
# Everything else that has a CUDA case.
# (--dist loadfile: the distributed tests of one file share a port, so they stay in one worker)
stage cuda_all 170 $P --dist loadfile -k cuda tests --ignore=tests/test_torch_parity.py --ignore=tests/test_packaging.py
stage gpu_ops 110 python3 benchmarks/gpu_ops.py --out "$OUT"
stage bench 110 python3 -m sparse_grad bench --device cuda --shapes llm-400m --backends triton,cuda \
    --densities 1,0.05,0.01 --out "$OUT/bench" --no-plot
stage sgd_lion_bench 60 python3 -m pytest -q -p no:cacheprovider benchmarks/test_sgd_lion_step.py --benchmark-only \
    --device cuda --shapes llm-400m --scale 1.0 -k "not reference"
stage end_to_end 60 python3 -m sparse_grad bench --end-to-end --device cuda --size large --steps 20 --out "$OUT/e2e"
# The end-to-end targets' GPU size (docs/design.md §7): every case of GPT-2 medium's shape, 303.9M params.
stage end_to_end_gpt2 150 python3 -m sparse_grad bench --end-to-end --device cuda --size gpt2-medium --steps 12 \
    --warmup 2 --out "$OUT/e2e_gpt2"
cat "$OUT/summary.txt"
[ -f "$OUT/gpu_ops.md" ] && cat "$OUT/gpu_ops.md"
