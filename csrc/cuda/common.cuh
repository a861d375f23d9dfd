// Device helpers shared by the kernels: element conversions, 16-byte vectors, block geometry,
// launch shape and a deterministic block reduction.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace sparse_grad {
namespace cuda_kernels {
namespace detail {

constexpr int kMaxThreads = 256;

// Threads per CTA for blocks of block_size elements: about 16 elements per thread, a whole
// number of warps (block_sum needs it), at most kMaxThreads.
inline int threads_for(int64_t block_size) {
  int threads = 32;
  while (threads < kMaxThreads && threads * int64_t{16} < block_size) threads *= 2;
  return threads;
}

// Grid of one CTA per item; kernels loop with a grid stride past the 2^31 - 1 limit.
inline unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(items < 0x7fffffff ? items : 0x7fffffff);
}

template <typename T>
__device__ __forceinline__ T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

// Tensor memory is global memory. Saying so about the pointer that is then indexed gets global
// loads and stores (ld.global) instead of generic ones; pointers read from a table are generic.
template <typename T>
__device__ __forceinline__ void assume_global(const T* p) {
  __builtin_assume(__isGlobal(p));
}

// Loads widen exactly to float (or stay double); the caller then converts to its compute type.
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// Stores round to nearest even, once. Narrowing double straight to a 16-bit type would round
// twice through float, so that overload does not exist.
template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
  static __device__ __forceinline__ float apply(float x) { return x; }
  static __device__ __forceinline__ float apply(double x) { return __double2float_rn(x); }
};
template <>
struct Narrow<double> {
  static __device__ __forceinline__ double apply(double x) { return x; }
};
template <>
struct Narrow<__half> {
  static __device__ __forceinline__ __half apply(float x) { return __float2half_rn(x); }
  static __device__ __half apply(double x) = delete;
};
template <>
struct Narrow<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 apply(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __nv_bfloat16 apply(double x) = delete;
};

// N elements loaded or stored as one vector access (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T x[N];
};

// How a block of len elements starting at an address splits: `head` scalar elements up to the
// first N-element-aligned address, `num_vecs` aligned vectors, then a scalar tail.
struct Split {
  int64_t head;
  int64_t num_vecs;
  __host__ __device__ __forceinline__ int64_t num_scalars(int64_t len, int n) const {
    return len - num_vecs * n;
  }
  // Element index of the k-th scalar element (head first, then tail).
  __host__ __device__ __forceinline__ int64_t scalar_index(int64_t k, int n) const {
    return k < head ? k : k + num_vecs * n;
  }
};

// Position of x within its N-element vector, or -1 if x is not even element aligned (then
// only scalar accesses are safe).
template <int N, typename T>
__host__ __device__ __forceinline__ int64_t vec_phase(const T* x) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(x);
  if (address % sizeof(T) != 0) return -1;
  return static_cast<int64_t>((address / sizeof(T)) % N);
}

// phase < 0: everything scalar.
template <int N>
__host__ __device__ __forceinline__ Split split_block(int64_t phase, int64_t len) {
  if (phase < 0) return {len, 0};
  const int64_t to_aligned = (N - phase) % N;
  const int64_t head = to_aligned < len ? to_aligned : len;
  return {head, (len - head) / N};
}

// Butterfly sum over a warp: the same order whatever the timing.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the CTA (blockDim.x a multiple of 32), in a fixed order; the result is valid in
// thread 0. Every thread of the CTA must call it.
template <typename A>
__device__ A block_sum(A x) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  x = warp_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  A total = 0;
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : A(0);
    total = warp_sum(total);
  }
  __syncthreads();  // warp_sums is reused by the CTA's next block (grid-stride loops)
  return total;
}

}  // namespace detail
}  // namespace cuda_kernels
}  // namespace sparse_grad
