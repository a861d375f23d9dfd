// The per-block inner loops of the CPU kernels, compiled once per instruction set (loops.cpp)
// and chosen at run time for the CPU the process runs on.
#pragma once

#include <cstdint>

#include "elements.h"

namespace sparse_grad::cpu {

// Per-block scalars of the AdamW update, computed in fp64 (see ops.cpp) and rounded to the
// compute type once per block by the loop.
struct AdamWScalars {
  double neg_step_size;          // -lr / (1 - beta1^s)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^s)
  double decay;                  // 1 - lr * weight_decay
  double eps;
  double beta2;
  double one_minus_beta2;
  double lerp_weight;            // 1 - beta1
  float grad_coef;               // grads are multiplied by it (clip coefficient / loss scale; 1)
};

// Per-block scalars of the SGD update (torch.optim.SGD), rounded to the compute type by the loop.
struct SGDScalars {
  double neg_lr;               // -lr
  double momentum;
  double one_minus_dampening;  // 1 - dampening
  double weight_decay;         // 0: no decay term at all (torch adds it only when nonzero)
  bool first;                  // the block's first update: the buffer becomes the gradient
  float grad_coef;
};

// Per-block scalars of the Lion update (lucidrains' lion-pytorch arithmetic).
struct LionScalars {
  double neg_lr;          // -lr
  double decay;           // 1 - lr * weight_decay
  double beta1;
  double one_minus_beta1;
  double beta2;
  double one_minus_beta2;
  float grad_coef;
};

// Sum of squares of x[0, n), accumulated in fp32 (fp64 for fp64 data), returned as fp32.
using SumSquaresFn = float (*)(const void* x, std::int64_t n);
// AdamW over n elements of one block: param, grad, exp_avg, exp_avg_sq.
using AdamWBlockFn = void (*)(void* param, const void* grad, void* exp_avg, void* exp_avg_sq,
                              std::int64_t n, const AdamWScalars& scalars);

// SGD over n elements of one block; momentum_buffer is nullptr without momentum.
using SGDBlockFn = void (*)(void* param, const void* grad, void* momentum_buffer, std::int64_t n,
                            const SGDScalars& scalars);
// Lion over n elements of one block.
using LionBlockFn = void (*)(void* param, const void* grad, void* exp_avg, std::int64_t n,
                             const LionScalars& scalars);

struct Loops {
  const char* isa;
  SumSquaresFn (*sum_squares)(DType dtype);
  // nullptr when the state dtype is neither the param dtype nor fp32.
  AdamWBlockFn (*adamw_block)(DType param, DType grad, DType state, bool maximize);
  SGDBlockFn (*sgd_block)(DType param, DType grad, DType state, bool maximize, bool nesterov,
                          bool has_buffer);
  LionBlockFn (*lion_block)(DType param, DType grad, DType state, bool maximize);
};

// The loops for this CPU (AVX-512, AVX2+FMA or baseline), or the instruction set named by the
// environment variable SPARSE_GRAD_CPU_ISA ("avx512", "avx2", "default"; for tests).
const Loops& loops();

}  // namespace sparse_grad::cpu
