#!/usr/bin/env bash
# One lent-GPU session: build with CUDA, correctness on CUDA first, then the benchmarks.
# Every stage has its own time limit and log under $OUT, so a slow stage costs only itself.
# Usage (on the GPU machine, repository root): OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 SPARSE_GRAD_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "stage $name: rc=$rc in $((SECONDS - t0)) s  | $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
stage build 150 python3 -m pip install --no-build-isolation --no-deps -e .
P="python3 -m pytest -q -p no:cacheprovider -p no:logging --timeout 120"
stage cuda_focus 150 $P tests/test_cuda_step.py tests/test_distributed_cuda.py tests/test_native.py -k cuda
stage demo_quick_cuda 90 python3 -m sparse_grad demo --quick --device cuda --out "$OUT/demo_quick" --no-progress
stage bench_400m 120 python3 -m sparse_grad bench --device cuda --shapes llm-400m --out "$OUT/bench" --no-plot
stage data_selection_100m 90 python3 benchmarks/test_data_selection.py --device cuda --rounds 5 --models tinylm-100m,tinylm
stage cuda_suite 200 $P tests -k "cuda and not test_packaging"
cat "$OUT/summary.txt"
