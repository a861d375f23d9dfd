#!/usr/bin/env bash
# One lent-GPU session: build with CUDA, correctness on CUDA first, then the host-cost and step
# benchmarks. Every stage has its own time limit and log under $OUT, so a slow stage costs only
# itself. Usage (on the GPU machine, repository root): OUT=/some/dir bash benchmarks/gpu_session.sh
# Optional: an older copy of the package in build/old (sparse_grad/ and triton_kernels/, e.g.
# `git archive <commit> sparse_grad triton_kernels | tar -x -C build/old`) is measured by
# benchmarks/host_time.py beside the checkout, on the same card.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 SPARSE_GRAD_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "stage $name: rc=$rc in $((SECONDS - t0)) s  | $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  lscpu | grep "Model name"
} >> "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
HOST="benchmarks/host_time.py --device cuda --densities 1,0.05,0.01 --json $OUT/host.jsonl"
if [ -d build/old/sparse_grad ]; then  # before the install: nothing but PYTHONPATH finds it
    stage host 70 env PYTHONPATH=build/old python3 $HOST --backends triton --label old
fi
stage build 120 python3 -m pip install --no-build-isolation --no-deps -e .
P="python3 -m pytest -q -p no:cacheprovider -p no:logging --timeout 120"
stage cuda_focus 150 $P tests/test_cuda_step.py tests/test_native.py tests/test_host_calls.py tests/test_launch_count.py \
    tests/test_compiled_step.py tests/test_sparse_adamw.py tests/test_distributed_cuda.py \
    tests/test_sparse_sgd_lion.py -k cuda
stage host 70 python3 $HOST --backends triton,cuda --label checkout
stage bench 110 python3 -m sparse_grad bench --device cuda --shapes llm-400m --backends triton,cuda \
    --densities 1,0.05,0.01 --out "$OUT/bench" --no-plot
stage sgd_lion_bench 100 python3 -m pytest -q -p no:cacheprovider benchmarks/test_sgd_lion_step.py --benchmark-only \
    --device cuda --shapes llm-400m --scale 1.0 -k "not reference"
cat "$OUT/summary.txt"
