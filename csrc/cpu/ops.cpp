// CPU kernels of sparse_grad::native_block_sqnorms and sparse_grad::native_sparse_adamw_step
// (schemas in sparse_grad/library.py): parallel over blocks, one vectorized loop per block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "loops.h"

namespace sparse_grad::cpu {
namespace {

// Elements per parallel task: small blocks are handed out in batches, and a list too small to
// be worth waking a second thread runs on the calling one.
constexpr std::int64_t kGrainElements = std::int64_t{1} << 15;

DType dtype_code(const at::Tensor& t, const char* list, std::size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, list, "[", i, "] has unsupported dtype ", t.scalar_type());
  }
}

void check_list(at::TensorList tensors, const char* list, std::size_t size) {
  TORCH_CHECK(tensors.size() == size, list, " has ", tensors.size(), " tensors, expected ", size);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), list, "[", i, "] is not a CPU tensor");
    TORCH_CHECK(tensors[i].is_contiguous(), list, "[", i, "] is not contiguous");
  }
}

// Global block numbering of a list of tensors (docs/design.md §2).
struct Blocks {
  std::int64_t block_size;
  std::vector<std::int64_t> numel;
  std::vector<std::int64_t> first;  // [T + 1]: first global block of each tensor, then the total

  Blocks(at::TensorList tensors, std::int64_t block_size) : block_size(block_size) {
    TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
    first.push_back(0);
    for (const at::Tensor& t : tensors) {
      numel.push_back(t.numel());
      first.push_back(first.back() + t.numel() / block_size + (t.numel() % block_size != 0));
    }
  }
  std::int64_t count() const { return first.back(); }
  // Blocks per parallel task, from the mean block length (tails and small tensors included).
  std::int64_t grain() const {
    std::int64_t elements = 0;
    for (const std::int64_t n : numel) elements += n;
    const std::int64_t mean_length = count() > 0 ? std::max<std::int64_t>(1, elements / count()) : 1;
    return std::max<std::int64_t>(1, kGrainElements / mean_length);
  }
  // The tensor owning global block `block` (tensors without blocks own none).
  std::size_t tensor_of(std::int64_t block) const {
    return std::upper_bound(first.begin(), first.end(), block) - first.begin() - 1;
  }
  std::int64_t start(std::size_t t, std::int64_t block) const {
    return (block - first[t]) * block_size;
  }
  std::int64_t length(std::size_t t, std::int64_t block) const {
    return std::min(block_size, numel[t] - start(t, block));
  }
};

// Raw view of one tensor of a list, taken once before the parallel loop.
struct Operand {
  char* data;
  std::int64_t element_size;

  explicit Operand(const at::Tensor& t)
      : data(static_cast<char*>(t.data_ptr())), element_size(t.element_size()) {}
  char* at(std::int64_t element) const { return data + element * element_size; }
};

std::vector<Operand> operands(at::TensorList tensors) {
  return std::vector<Operand>(tensors.begin(), tensors.end());
}

at::Tensor block_sqnorms(at::TensorList tensors, std::int64_t block_size) {
  check_list(tensors, "tensors", tensors.size());
  const Blocks blocks(tensors, block_size);
  at::Tensor out = at::empty({blocks.count()}, at::TensorOptions().dtype(at::kFloat));
  std::vector<SumSquaresFn> sum_squares;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    sum_squares.push_back(loops().sum_squares(dtype_code(tensors[i], "tensors", i)));
  }
  const std::vector<Operand> data = operands(tensors);
  float* result = out.data_ptr<float>();
  at::parallel_for(0, blocks.count(), blocks.grain(), [&](std::int64_t begin, std::int64_t end) {
    std::size_t t = blocks.tensor_of(begin);
    for (std::int64_t block = begin; block < end; ++block) {
      while (block >= blocks.first[t + 1]) ++t;
      result[block] = sum_squares[t](data[t].at(blocks.start(t, block)), blocks.length(t, block));
    }
  });
  return out;
}

// Scalars in fp64, as torch.optim.AdamW computes them on the host.
AdamWScalars adamw_scalars(std::int32_t step, double lr, double beta1, double beta2, double eps,
                           double weight_decay, float grad_coef) {
  return AdamWScalars{
      -lr / (1.0 - std::pow(beta1, step)),
      std::sqrt(1.0 - std::pow(beta2, step)),
      1.0 - lr * weight_decay,
      eps,
      beta2,
      1.0 - beta2,
      1.0 - beta1,
      grad_coef,
  };
}

// An optional one-element fp32 CPU tensor of the update (grad_coef, found_inf).
const float* optional_scalar(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1,
              name, " must be a one-element float32 CPU tensor");
  return t->const_data_ptr<float>();
}

// Checks the moments and step counts of tensor t and returns its update loop. Dense state: one
// tensor per param (like it, one count per block). Compact state (compact=true): one slab
// [num_ids, block_size] of moments and one count per id, row i belonging to block_ids[i].
AdamWBlockFn checked_update(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList block_steps,
                            const Blocks& blocks, std::size_t t, bool compact, bool maximize) {
  TORCH_CHECK(grads[t].numel() == params[t].numel(), "grads[", t, "] has ", grads[t].numel(),
              " elements, params[", t, "] ", params[t].numel());
  const std::size_t s = compact ? 0 : t;
  if (!compact) {
    for (const at::Tensor* other : {&exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(other->numel() == params[t].numel(), "tensor ", t, " of exp_avgs/exp_avg_sqs has ",
                  other->numel(), " elements, params[", t, "] ", params[t].numel());
    }
    TORCH_CHECK(block_steps[t].scalar_type() == at::kInt &&
                block_steps[t].numel() == blocks.first[t + 1] - blocks.first[t],
                "block_steps[", t, "] must be int32 with one count per block of params[", t, "]");
  }
  TORCH_CHECK(exp_avgs[s].scalar_type() == exp_avg_sqs[s].scalar_type(),
              "exp_avgs[", s, "] and exp_avg_sqs[", s, "] have different dtypes");
  AdamWBlockFn update = loops().adamw_block(dtype_code(params[t], "params", t), dtype_code(grads[t], "grads", t),
                                            dtype_code(exp_avgs[s], "exp_avgs", s), maximize);
  TORCH_CHECK(update != nullptr, "exp_avgs[", s, "] is ", exp_avgs[s].scalar_type(),
              "; the state dtype must be the param dtype or float32");
  return update;
}

void sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList block_steps,
                       const at::Tensor& block_ids, const at::Tensor& hyper, std::int64_t block_size,
                       bool maximize, const std::optional<at::Tensor>& grad_coef,
                       const std::optional<at::Tensor>& found_inf, bool compact) {
  const std::size_t num_tensors = params.size();
  const std::size_t num_states = compact ? 1 : num_tensors;
  check_list(params, "params", num_tensors);
  check_list(grads, "grads", num_tensors);
  check_list(exp_avgs, "exp_avgs", num_states);
  check_list(exp_avg_sqs, "exp_avg_sqs", num_states);
  check_list(block_steps, "block_steps", num_states);
  TORCH_CHECK(block_ids.device().is_cpu() && block_ids.scalar_type() == at::kLong &&
              block_ids.dim() == 1 && block_ids.is_contiguous(),
              "block_ids must be a contiguous 1-D int64 CPU tensor");
  const std::int64_t num_ids = block_ids.numel();
  if (compact) {
    TORCH_CHECK(exp_avgs[0].numel() == num_ids * block_size && exp_avg_sqs[0].numel() == num_ids * block_size,
                "compact exp_avgs[0] and exp_avg_sqs[0] must hold block_size elements per block id");
    TORCH_CHECK(block_steps[0].scalar_type() == at::kInt && block_steps[0].numel() == num_ids,
                "compact block_steps[0] must be int32 with one count per block id");
  }
  const float* coef = optional_scalar(grad_coef, "grad_coef");
  const float* inf = optional_scalar(found_inf, "found_inf");
  // The hyper-parameter table [lr, beta1, beta2, eps, weight_decay] (CPU memory: read, no sync).
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.numel() == 5 &&
              hyper.is_contiguous(), "hyper must be a contiguous float64 CPU tensor of 5 values");
  const double* h = hyper.const_data_ptr<double>();
  const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], weight_decay = h[4];
  const Blocks blocks(params, block_size);
  std::vector<AdamWBlockFn> update(num_tensors);
  for (std::size_t t = 0; t < num_tensors; ++t) {
    update[t] = checked_update(params, grads, exp_avgs, exp_avg_sqs, block_steps, blocks, t, compact, maximize);
  }
  // An overflowed AMP step changes nothing, step counts included (read here: CPU memory, no sync).
  if (inf != nullptr && *inf != 0.0f) return;
  const float coef_value = coef != nullptr ? *coef : 1.0f;
  const std::vector<Operand> param = operands(params), grad = operands(grads),
                            exp_avg = operands(exp_avgs), exp_avg_sq = operands(exp_avg_sqs);
  std::vector<std::int32_t*> steps;
  for (const at::Tensor& s : block_steps) steps.push_back(s.data_ptr<std::int32_t>());
  const std::int64_t* ids = block_ids.data_ptr<std::int64_t>();
  at::parallel_for(0, num_ids, blocks.grain(), [&](std::int64_t begin, std::int64_t end) {
    // Blocks mostly share a step count: compute the scalars (two pow) once per count seen.
    std::int32_t scalars_step = 0;
    AdamWScalars scalars{};
    for (std::int64_t i = begin; i < end; ++i) {
      const std::int64_t block = ids[i];
      if (block < 0 || block >= blocks.count()) continue;  // out of range: updates nothing
      const std::size_t t = blocks.tensor_of(block);
      const std::int64_t start = blocks.start(t, block);
      // Where this block's state lives: its own place in per-param state, or slab row i.
      const std::size_t s = compact ? 0 : t;
      const std::int64_t state_start = compact ? i * block_size : start;
      const std::int32_t step = ++steps[s][compact ? i : block - blocks.first[t]];
      if (step != scalars_step) {
        scalars_step = step;
        scalars = adamw_scalars(step, lr, beta1, beta2, eps, weight_decay, coef_value);
      }
      update[t](param[t].at(start), grad[t].at(start), exp_avg[s].at(state_start),
                exp_avg_sq[s].at(state_start), blocks.length(t, block), scalars);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_grad, CPU, m) {
  m.impl("native_block_sqnorms", &block_sqnorms);
  m.impl("native_sparse_adamw_step", &sparse_adamw_step);
}

}  // namespace sparse_grad::cpu
