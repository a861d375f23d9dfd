// Per-block sums of squares over a list of tensors of any mix of dtypes, in one launch.
#include "common.cuh"

namespace sparse_grad {
namespace cuda_kernels {
namespace {

using namespace detail;

// fp32 accumulation for 16/32-bit inputs, fp64 for fp64 inputs.
template <typename T>
using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

__device__ __forceinline__ float square_add(float x, float acc) { return __fmaf_rn(x, x, acc); }
__device__ __forceinline__ double square_add(double x, double acc) { return __fma_rn(x, x, acc); }

template <typename A, typename T, int N>
__device__ __forceinline__ A add_squares(A acc, const Vec<T, N>& v) {
#pragma unroll
  for (int k = 0; k < N; ++k) acc = square_add(static_cast<A>(widen(v.x[k])), acc);
  return acc;
}

// Sum of squares of x[0 .. len), by the whole CTA; valid in thread 0. The order of the additions
// depends only on len, x's alignment and blockDim: the result is deterministic.
template <typename T>
__device__ float block_sqnorm(const T* x, int64_t len) {
  using A = Acc<T>;
  constexpr int N = 16 / sizeof(T);
  // Each thread issues up to U vector loads before it adds any (memory-level parallelism), into
  // U separate sums (shorter dependency chains, smaller rounding error).
  constexpr int U = 4;
  assume_global(x);
  const Split split = split_block<N>(vec_phase<N>(x), len);
  const Vec<T, N>* vecs = reinterpret_cast<const Vec<T, N>*>(x + split.head);
  const int64_t stride = blockDim.x;

  A acc[U];
#pragma unroll
  for (int u = 0; u < U; ++u) acc[u] = 0;
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < split.num_vecs; j += U * stride) {
    Vec<T, N> v[U] = {};  // initialized: leaving the unloaded ones undefined costs registers
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j + u * stride < split.num_vecs) v[u] = vecs[j + u * stride];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j + u * stride < split.num_vecs) acc[u] = add_squares(acc[u], v[u]);
    }
  }
  const int64_t num_scalars = split.num_scalars(len, N);
#pragma unroll 1
  for (int64_t k = threadIdx.x; k < num_scalars; k += stride) {
    acc[0] = square_add(static_cast<A>(widen(x[split.scalar_index(k, N)])), acc[0]);
  }
  A total = acc[0];
#pragma unroll
  for (int u = 1; u < U; ++u) total += acc[u];
  return static_cast<float>(block_sum(total));
}

__global__ void __launch_bounds__(kMaxThreads)
block_sqnorms_kernel(float* out, BlockMap map, const int64_t* data_ptrs, const int64_t* dtypes) {
  for (int64_t b = blockIdx.x; b < map.num_blocks; b += gridDim.x) {
    const int32_t t = map.block_tensor[b];
    const int64_t start = (b - map.first_block[t]) * map.block_size;
    const int64_t len = min(map.block_size, map.numels[t] - start);
    const int64_t base = data_ptrs[t];
    // The dtype is the same for the whole CTA, so block_sum's barriers are not divergent.
    float sum;
    switch (static_cast<DType>(dtypes[t])) {
      case DType::Float32: sum = block_sqnorm(as_ptr<const float>(base) + start, len); break;
      case DType::Float16: sum = block_sqnorm(as_ptr<const __half>(base) + start, len); break;
      case DType::BFloat16:
        sum = block_sqnorm(as_ptr<const __nv_bfloat16>(base) + start, len);
        break;
      case DType::Float64: sum = block_sqnorm(as_ptr<const double>(base) + start, len); break;
      default: sum = __int_as_float(0x7fc00000); break;  // the binding rejects other dtypes
    }
    if (threadIdx.x == 0) out[b] = sum;
  }
}

}  // namespace

cudaError_t launch_block_sqnorms(float* out, const BlockMap& map, const int64_t* data_ptrs,
                                 const int64_t* dtypes, cudaStream_t stream) {
  if (map.num_blocks <= 0) return cudaSuccess;
  block_sqnorms_kernel<<<grid_for(map.num_blocks), threads_for(map.block_size), 0, stream>>>(
      out, map, data_ptrs, dtypes);
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace sparse_grad
