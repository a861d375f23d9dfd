// AdamW, SGD and Lion on selected blocks only: one CTA per selected block id, one launch per
// (param, grad, state) dtype triple of the list; the rule is a template parameter, so each
// kernel touches only its own state.
//
// The arithmetic is the reference backend's, operation by operation, as torch's CUDA kernels
// round it: fp32 math (fp64 for fp64 params), every operation rounded once, written with the
// _rn intrinsics so that nvcc cannot contract a multiply and an add whatever the flags. The two
// FMAs are torch's own: lerp (fma(w, end - self, self)) and addcmul (fma(value, t1 * t2, self),
// ATen/native/cuda/DeviceAddCmulCdiv.cuh).
#include "common.cuh"

namespace sparse_grad {
namespace cuda_kernels {
namespace {

using namespace detail;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// fp32 math for 16/32-bit params, fp64 math for fp64 params.
template <typename P>
using Compute = typename std::conditional<std::is_same<P, double>::value, double, float>::type;

// base ** n for n >= 0 by repeated squaring in fp64, in the Triton kernel's order.
__device__ double pow_int(double base, int32_t n) {
  double result = 1.0;
  while (n > 0) {
    if (n & 1) result = __dmul_rn(result, base);
    base = __dmul_rn(base, base);
    n >>= 1;
  }
  return result;
}

// A block's scalars: computed in fp64 and rounded once, as torch.optim.AdamW computes them on
// the host.
template <typename C>
struct Scalars {
  C neg_step_size;          // -lr / (1 - beta1^step)
  C bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  C decay;                  // 1 - lr * weight_decay
  C eps;
  C beta2;
  C one_minus_beta2;
  // exp_avg.lerp_(grad, w) as torch computes it: fma(w, grad - exp_avg, exp_avg) for |w| < 0.5,
  // else fma(w - 1, grad - exp_avg, grad).
  C lerp_coeff;
  bool lerp_small_weight;
  bool maximize;
  C grad_coef;  // 1 when absent: g * 1 is exact
};

template <typename C>
__device__ Scalars<C> block_scalars(const AdamwHyper& h, int32_t step) {
  const double lr = h.values[0], beta1 = h.values[1], beta2 = h.values[2], eps = h.values[3],
               weight_decay = h.values[4];
  Scalars<C> s;
  s.neg_step_size = static_cast<C>(__ddiv_rn(-lr, __dsub_rn(1.0, pow_int(beta1, step))));
  s.bias_correction2_sqrt = static_cast<C>(__dsqrt_rn(__dsub_rn(1.0, pow_int(beta2, step))));
  s.decay = static_cast<C>(__dsub_rn(1.0, __dmul_rn(lr, weight_decay)));
  s.eps = static_cast<C>(eps);
  s.beta2 = static_cast<C>(beta2);
  s.one_minus_beta2 = static_cast<C>(__dsub_rn(1.0, beta2));
  const C weight = static_cast<C>(__dsub_rn(1.0, beta1));
  s.lerp_small_weight = fabs(weight) < C(0.5);
  s.lerp_coeff = s.lerp_small_weight ? weight : sub_rn(weight, C(1));
  s.maximize = h.maximize;
  s.grad_coef = h.grad_coef != nullptr ? static_cast<C>(*h.grad_coef) : C(1);
  return s;
}

// SGD's and Lion's block scalars (docs/design.md §3.7), rounded once from fp64 like AdamW's.
template <typename C>
struct OtherScalars {
  C neg_lr;
  C a;  // SGD: momentum;                 Lion: beta1
  C b;  // SGD: 1 - dampening;            Lion: 1 - beta1
  C c;  // SGD: weight_decay;             Lion: beta2
  C d;  // SGD: unused;                   Lion: 1 - beta2
  C decay;  // Lion: 1 - lr * weight_decay
  bool decays;  // SGD: weight_decay != 0 (torch adds the term only then)
  bool first;   // SGD: the block's first update (the buffer becomes the gradient)
  bool maximize;
  C grad_coef;
};

template <typename C>
__device__ OtherScalars<C> other_scalars(const AdamwHyper& h, int32_t step) {
  const double* v = h.values;
  OtherScalars<C> s;
  s.neg_lr = static_cast<C>(-v[0]);
  s.maximize = h.maximize;
  s.grad_coef = h.grad_coef != nullptr ? static_cast<C>(*h.grad_coef) : C(1);
  s.first = step == 1;
  if (h.rule == Rule::SGD) {
    s.a = static_cast<C>(v[1]);
    s.b = static_cast<C>(__dsub_rn(1.0, v[2]));
    s.c = static_cast<C>(v[3]);
    s.d = C(0);
    s.decay = C(1);
    s.decays = v[3] != 0.0;
  } else {
    s.a = static_cast<C>(v[1]);
    s.b = static_cast<C>(__dsub_rn(1.0, v[1]));
    s.c = static_cast<C>(v[2]);
    s.d = static_cast<C>(__dsub_rn(1.0, v[2]));
    s.decay = static_cast<C>(__dsub_rn(1.0, __dmul_rn(v[0], v[3])));
    s.decays = false;
  }
  return s;
}

// torch.optim.SGD's arithmetic; `x.add(y, alpha=a)` is fma(y, a, x), as torch's add kernel.
template <bool kNesterov, bool kBuffer, typename C, typename P, typename G, typename S>
__device__ __forceinline__ void sgd_element(P& param, G grad, S& buffer, const OtherScalars<C>& s) {
  const C p = static_cast<C>(widen(param));
  C g = mul_rn(static_cast<C>(widen(grad)), s.grad_coef);
  if (s.maximize) g = -g;
  if (s.decays) g = fma_rn(p, s.c, g);
  if (kBuffer) {
    const C buf = s.first ? g : fma_rn(g, s.b, mul_rn(static_cast<C>(widen(buffer)), s.a));
    buffer = Narrow<S>::apply(buf);
    g = kNesterov ? fma_rn(buf, s.a, g) : buf;
  }
  param = Narrow<P>::apply(fma_rn(g, s.neg_lr, p));
}

// Lion as lion-pytorch computes it with torch ops; sign(NaN) is 0, as torch.sign.
template <typename C, typename P, typename G, typename S>
__device__ __forceinline__ void lion_element(P& param, G grad, S& exp_avg, const OtherScalars<C>& s) {
  C g = mul_rn(static_cast<C>(widen(grad)), s.grad_coef);
  if (s.maximize) g = -g;
  const C m = static_cast<C>(widen(exp_avg));
  const C c = fma_rn(g, s.b, mul_rn(m, s.a));
  const C sign = static_cast<C>(C(0) < c) - static_cast<C>(c < C(0));
  param = Narrow<P>::apply(fma_rn(sign, s.neg_lr, mul_rn(static_cast<C>(widen(param)), s.decay)));
  exp_avg = Narrow<S>::apply(fma_rn(g, s.d, mul_rn(m, s.c)));
}

// The len elements of one SGD or Lion block, by the whole CTA (as update_block, with one state
// array, or none: SGD without momentum).
template <Rule R, bool kNesterov, bool kBuffer, int N, typename C, typename P, typename G, typename S>
__device__ __forceinline__ void other_block(P* param, const G* grad, S* state, int64_t len,
                                            const OtherScalars<C>& s) {
  assume_global(param);
  assume_global(grad);
  const int64_t phase = vec_phase<N>(param);
  const bool aligned = phase >= 0 && vec_phase<N>(grad) == phase && (!kBuffer || vec_phase<N>(state) == phase);
  const Split split = split_block<N>(aligned ? phase : -1, len);
  const int64_t stride = blockDim.x;
  for (int64_t j = threadIdx.x; j < split.num_vecs; j += stride) {
    const int64_t i = split.head + j * N;
    Vec<P, N> p = *reinterpret_cast<const Vec<P, N>*>(param + i);
    const Vec<G, N> g = *reinterpret_cast<const Vec<G, N>*>(grad + i);
    Vec<S, N> m;
    if (kBuffer) m = *reinterpret_cast<const Vec<S, N>*>(state + i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (R == Rule::SGD) {
        sgd_element<kNesterov, kBuffer>(p.x[k], g.x[k], m.x[k], s);
      } else {
        lion_element(p.x[k], g.x[k], m.x[k], s);
      }
    }
    *reinterpret_cast<Vec<P, N>*>(param + i) = p;
    if (kBuffer) *reinterpret_cast<Vec<S, N>*>(state + i) = m;
  }
  const int64_t num_scalars = split.num_scalars(len, N);
  for (int64_t k = threadIdx.x; k < num_scalars; k += stride) {
    const int64_t i = split.scalar_index(k, N);
    S unused{};
    S& m = kBuffer ? state[i] : unused;
    if (R == Rule::SGD) {
      sgd_element<kNesterov, kBuffer>(param[i], grad[i], m, s);
    } else {
      lion_element(param[i], grad[i], m, s);
    }
  }
}

// One element: loads widen to C, stores round to nearest even.
template <typename C, typename P, typename G, typename S>
__device__ __forceinline__ void update_element(P& param, G grad, S& exp_avg, S& exp_avg_sq,
                                               const Scalars<C>& s) {
  C p = static_cast<C>(widen(param));
  C g = static_cast<C>(widen(grad));
  C m = static_cast<C>(widen(exp_avg));
  C v = static_cast<C>(widen(exp_avg_sq));
  g = mul_rn(g, s.grad_coef);
  if (s.maximize) g = -g;
  p = mul_rn(p, s.decay);
  m = fma_rn(s.lerp_coeff, sub_rn(g, m), s.lerp_small_weight ? m : g);
  v = fma_rn(s.one_minus_beta2, mul_rn(g, g), mul_rn(v, s.beta2));  // mul_(beta2).addcmul_(g, g)
  const C denom = add_rn(div_rn(sqrt_rn(v), s.bias_correction2_sqrt), s.eps);
  p = add_rn(p, div_rn(mul_rn(s.neg_step_size, m), denom));
  param = Narrow<P>::apply(p);
  exp_avg = Narrow<S>::apply(m);
  exp_avg_sq = Narrow<S>::apply(v);
}

// The len elements of one block, by the whole CTA. Vector accesses need the four arrays at the
// same position within their N-element vectors (always so for block_size % N == 0 and
// allocator-aligned tensors); otherwise the block is done element by element.
template <int N, typename C, typename P, typename G, typename S>
__device__ __forceinline__ void update_block(P* param, const G* grad, S* exp_avg, S* exp_avg_sq,
                                             int64_t len, const Scalars<C>& s) {
  assume_global(param);
  assume_global(grad);
  assume_global(exp_avg);
  assume_global(exp_avg_sq);
  const int64_t phase = vec_phase<N>(param);
  const bool aligned = phase >= 0 && vec_phase<N>(grad) == phase &&
                       vec_phase<N>(exp_avg) == phase && vec_phase<N>(exp_avg_sq) == phase;
  const Split split = split_block<N>(aligned ? phase : -1, len);
  const int64_t stride = blockDim.x;
  for (int64_t j = threadIdx.x; j < split.num_vecs; j += stride) {
    const int64_t i = split.head + j * N;
    Vec<P, N> p = *reinterpret_cast<const Vec<P, N>*>(param + i);
    const Vec<G, N> g = *reinterpret_cast<const Vec<G, N>*>(grad + i);
    Vec<S, N> m = *reinterpret_cast<const Vec<S, N>*>(exp_avg + i);
    Vec<S, N> v = *reinterpret_cast<const Vec<S, N>*>(exp_avg_sq + i);
#pragma unroll
    for (int k = 0; k < N; ++k) update_element(p.x[k], g.x[k], m.x[k], v.x[k], s);
    *reinterpret_cast<Vec<P, N>*>(param + i) = p;
    *reinterpret_cast<Vec<S, N>*>(exp_avg + i) = m;
    *reinterpret_cast<Vec<S, N>*>(exp_avg_sq + i) = v;
  }
  const int64_t num_scalars = split.num_scalars(len, N);
  for (int64_t k = threadIdx.x; k < num_scalars; k += stride) {
    const int64_t i = split.scalar_index(k, N);
    update_element(param[i], grad[i], exp_avg[i], exp_avg_sq[i], s);
  }
}

// Elements per vector access: 16 bytes of the widest of the three types, fewer of the others.
template <typename P, typename G, typename S>
struct VecWidth {
  static constexpr size_t kPG = sizeof(P) > sizeof(G) ? sizeof(P) : sizeof(G);
  static constexpr int value = static_cast<int>(16 / (kPG > sizeof(S) ? kPG : sizeof(S)));
};

template <Rule R, bool kNesterov, bool kBuffer, typename P, typename G, typename S>
__global__ void __launch_bounds__(kMaxThreads)
sparse_update_kernel(AdamwTables tables, BlockMap map, const int64_t* block_ids, int64_t num_ids,
                     int64_t combo, AdamwHyper hyper) {
  using C = Compute<P>;
  constexpr int N = VecWidth<P, G, S>::value;
  // An overflowed AMP step: every CTA leaves before touching anything (a uniform branch).
  if (hyper.found_inf != nullptr && *hyper.found_inf != 0.0f) return;
  for (int64_t i = blockIdx.x; i < num_ids; i += gridDim.x) {
    // Every thread of the CTA takes the same branches here: b and t are the CTA's.
    const int64_t b = block_ids[i];
    if (b < 0 || b >= map.num_blocks) continue;  // an out-of-range id updates nothing
    const int32_t t = map.block_tensor[b];
    if (tables.dtype_combos[t] != combo) continue;  // another launch's dtype triple
    const int64_t local = b - map.first_block[t];

    // Where the block's state lives: its own place in per-param state, or slab row i.
    int32_t* step_ptr = hyper.compact ? as_ptr<int32_t>(tables.block_steps[0]) + i
                                      : as_ptr<int32_t>(tables.block_steps[t]) + local;
    assume_global(step_ptr);
    const int32_t step = *step_ptr + 1;
    __syncthreads();  // every thread has read the old count before thread 0 replaces it
    if (threadIdx.x == 0) *step_ptr = step;

    const int64_t start = local * map.block_size;
    const int64_t len = min(map.block_size, map.numels[t] - start);
    const int64_t state_t = hyper.compact ? 0 : t;
    const int64_t state_start = hyper.compact ? i * map.block_size : start;
    const G* grad = hyper.compact_grads ? as_ptr<const G>(tables.grads[0]) + i * map.block_size
                                        : as_ptr<const G>(tables.grads[t]) + start;
    if constexpr (R == Rule::AdamW) {
      const Scalars<C> s = block_scalars<C>(hyper, step);
      update_block<N>(as_ptr<P>(tables.params[t]) + start, grad,
                      as_ptr<S>(tables.exp_avgs[state_t]) + state_start,
                      as_ptr<S>(tables.exp_avg_sqs[state_t]) + state_start, len, s);
    } else {
      const OtherScalars<C> s = other_scalars<C>(hyper, step);
      S* state = kBuffer ? as_ptr<S>(tables.exp_avgs[state_t]) + state_start : nullptr;
      other_block<R, kNesterov, kBuffer, N>(as_ptr<P>(tables.params[t]) + start,
                                            grad, state, len, s);
    }
  }
}

template <Rule R, bool kNesterov, bool kBuffer, typename P, typename G, typename S>
cudaError_t launch_rule(const AdamwTables& tables, const BlockMap& map, const int64_t* block_ids,
                        int64_t num_ids, int64_t combo, const AdamwHyper& hyper, cudaStream_t stream) {
  sparse_update_kernel<R, kNesterov, kBuffer, P, G, S>
      <<<grid_for(num_ids), threads_for(map.block_size), 0, stream>>>(tables, map, block_ids, num_ids,
                                                                     combo, hyper);
  return cudaGetLastError();
}

template <typename P, typename G, typename S>
cudaError_t launch(const AdamwTables& tables, const BlockMap& map, const int64_t* block_ids,
                   int64_t num_ids, int64_t combo, const AdamwHyper& hyper,
                   cudaStream_t stream) {
  switch (hyper.rule) {
    case Rule::AdamW:
      return launch_rule<Rule::AdamW, false, true, P, G, S>(tables, map, block_ids, num_ids, combo, hyper, stream);
    case Rule::Lion:
      return launch_rule<Rule::Lion, false, true, P, G, S>(tables, map, block_ids, num_ids, combo, hyper, stream);
    case Rule::SGD:
      if (!hyper.has_buffer) {
        return launch_rule<Rule::SGD, false, false, P, G, S>(tables, map, block_ids, num_ids, combo, hyper, stream);
      }
      if (hyper.nesterov) {
        return launch_rule<Rule::SGD, true, true, P, G, S>(tables, map, block_ids, num_ids, combo, hyper, stream);
      }
      return launch_rule<Rule::SGD, false, true, P, G, S>(tables, map, block_ids, num_ids, combo, hyper, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}) with the element type T of dtype.
template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(Type<float>{});
    case DType::Float16: return f(Type<__half>{});
    case DType::BFloat16: return f(Type<__nv_bfloat16>{});
    case DType::Float64: return f(Type<double>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_sparse_adamw(const AdamwTables& tables, const BlockMap& map,
                                const int64_t* block_ids, int64_t num_ids, DType param,
                                DType grad, DType state, const AdamwHyper& hyper,
                                cudaStream_t stream) {
  if (num_ids <= 0 || map.num_blocks <= 0) return cudaSuccess;
  const int64_t combo = dtype_combo(param, grad, state);
  return with_type(param, [&](auto p) {
    return with_type(grad, [&](auto g) {
      using P = typename decltype(p)::type;
      using G = typename decltype(g)::type;
      if (state == param) {
        return launch<P, G, P>(tables, map, block_ids, num_ids, combo, hyper, stream);
      }
      if (state == DType::Float32) {
        return launch<P, G, float>(tables, map, block_ids, num_ids, combo, hyper, stream);
      }
      return cudaErrorInvalidValue;
    });
  });
}

}  // namespace cuda_kernels
}  // namespace sparse_grad
