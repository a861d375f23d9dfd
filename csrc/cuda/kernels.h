// Host API of the CUDA kernels: raw device pointers, sizes, dtype codes and a stream.
//
// No torch types here, so the .cu files compile with nvcc alone (also where torch has no CUDA);
// binding.cpp is the only file that knows about tensors.
//
// Multi-tensor scheme: a list of T tensors is described by device tables with one int64 entry
// per tensor (base addresses, element counts, first global block, dtype codes) plus an int32
// block -> tensor map, so one launch covers the whole list whatever T is.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sparse_grad {
namespace cuda_kernels {

// Element type codes, stored as int64 in the per-tensor dtype tables.
enum class DType : int64_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// One code per (param, grad, state) dtype triple: the update runs one launch per distinct code.
constexpr int64_t dtype_combo(DType param, DType grad, DType state) {
  return (static_cast<int64_t>(param) * 4 + static_cast<int64_t>(grad)) * 4 +
         static_cast<int64_t>(state);
}

// Where the blocks of a list of T tensors live. All pointers are device pointers.
struct BlockMap {
  const int64_t* numels;        // [T] elements of each tensor
  const int64_t* first_block;   // [T] global id of each tensor's first block
  const int32_t* block_tensor;  // [num_blocks] index of the tensor owning each block
  int64_t num_blocks;
  int64_t block_size;           // > 0; the last block of a tensor may be shorter
};

// out[b] = sum of squares of block b, for every block of the list (one launch).
// data_ptrs[t]: base address of tensor t; dtypes[t]: its DType code (lists may mix dtypes).
// Accumulates in fp32, or in fp64 for fp64 tensors. out: fp32 [map.num_blocks].
cudaError_t launch_block_sqnorms(float* out, const BlockMap& map, const int64_t* data_ptrs,
                                 const int64_t* dtypes, cudaStream_t stream);

// Per-tensor device tables of the update, [T] int64 entries each.
struct AdamwTables {
  const int64_t* params;        // base addresses
  const int64_t* grads;
  const int64_t* exp_avgs;
  const int64_t* exp_avg_sqs;
  const int64_t* block_steps;   // base addresses of int32 [blocks of tensor t]
  const int64_t* dtype_combos;  // dtype_combo(param, grad, state) of each tensor
};

// The update a launch applies (docs/design.md §3.4, §3.7). SGD keeps its momentum buffers and
// Lion its exp_avg in the exp_avgs table; the exp_avg_sqs table is read by AdamW only.
enum class Rule : int32_t { AdamW = 0, SGD = 1, Lion = 2 };

struct AdamwHyper {
  // Device fp64 hyper-parameters, read by the kernel: a tensor lr that a scheduler changes in
  // place needs no host sync, and the launch arguments do not change. AdamW: [lr, beta1, beta2,
  // eps, weight_decay]; SGD: [lr, momentum, dampening, weight_decay]; Lion: [lr, beta1, beta2,
  // weight_decay].
  const double* values;
  bool maximize;
  // Optional device scalars (nullptr: absent), read by the kernel so the host never syncs:
  const float* grad_coef;  // grads are multiplied by it (clip coefficient / loss scale)
  const float* found_inf;  // nonzero: the launch changes nothing, step counts included
  // Compact state: the moment tables hold one slab [num_ids, block_size] (entry 0) and the step
  // table one count per id; row i is the state of block_ids[i].
  bool compact;
  Rule rule = Rule::AdamW;
  bool nesterov = false;    // SGD
  bool has_buffer = true;   // SGD: false for momentum 0 (no buffers; the exp_avgs table unused)
  // Compact grads: the grad table holds one slab [num_ids, block_size] (entry 0); row i is the
  // gradient of block_ids[i] (the rows of a compact state, for the same ids).
  bool compact_grads = false;
};

// The update hyper.rule (AdamW, SGD or Lion) on the blocks block_ids[0 .. num_ids) (global ids, device int64) whose tensor has the
// dtype triple (param, grad, state); blocks of other triples and ids outside [0, num_blocks)
// are left untouched. Call once per distinct triple of the list.
// Supported: param, grad in any DType; state == param or state == Float32.
cudaError_t launch_sparse_adamw(const AdamwTables& tables, const BlockMap& map,
                                const int64_t* block_ids, int64_t num_ids, DType param,
                                DType grad, DType state, const AdamwHyper& hyper,
                                cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace sparse_grad
