// CPU kernels of sparse_grad::native_block_sqnorms and native_sparse_{adamw,sgd,lion}_step
// (schemas in sparse_grad/library.py): parallel over blocks, one vectorized loop per block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
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

// The state lists of an update (AdamW: exp_avgs, exp_avg_sqs; SGD: momentum_buffers or none;
// Lion: exp_avgs) and its step counts, checked against the params. Dense state: one tensor per
// param, like it, and one count per block. Compact state (compact=true): one slab
// [num_ids, block_size] per list and one count per id, row i belonging to block_ids[i]. Compact
// grads (compact_grads=true): one slab [num_ids, block_size], row i the gradient of block_ids[i].
void check_state(at::TensorList params, at::TensorList grads,
                 std::initializer_list<std::pair<const char*, at::TensorList>> states,
                 at::TensorList block_steps, const Blocks& blocks, const at::Tensor& block_ids, bool compact,
                 bool compact_grads = false) {
  const std::size_t num_tensors = params.size();
  const std::size_t num_states = compact ? 1 : num_tensors;
  check_list(params, "params", num_tensors);
  check_list(grads, "grads", compact_grads ? 1 : num_tensors);
  for (const auto& [name, list] : states) check_list(list, name, num_states);
  check_list(block_steps, "block_steps", num_states);
  TORCH_CHECK(block_ids.device().is_cpu() && block_ids.scalar_type() == at::kLong &&
              block_ids.dim() == 1 && block_ids.is_contiguous(),
              "block_ids must be a contiguous 1-D int64 CPU tensor");
  const std::int64_t num_ids = block_ids.numel();
  TORCH_CHECK(!compact_grads || grads[0].numel() == num_ids * blocks.block_size, "grads[0] has ",
              grads[0].numel(), " elements, expected ", num_ids * blocks.block_size, " (block_size per block id)");
  for (std::size_t t = 0; t < num_tensors && !compact_grads; ++t) {
    TORCH_CHECK(grads[t].numel() == params[t].numel(), "grads[", t, "] has ", grads[t].numel(),
                " elements, params[", t, "] ", params[t].numel());
  }
  for (const auto& [name, list] : states) {
    for (std::size_t s = 0; s < num_states; ++s) {
      const std::int64_t expected = compact ? num_ids * blocks.block_size : params[s].numel();
      TORCH_CHECK(list[s].numel() == expected, name, "[", s, "] has ", list[s].numel(), " elements, expected ",
                  expected, compact ? " (block_size per block id)" : " (like the param)");
      TORCH_CHECK(list[s].scalar_type() == states.begin()->second[s].scalar_type(), name, "[", s,
                  "] and ", states.begin()->first, "[", s, "] have different dtypes");
    }
  }
  for (std::size_t s = 0; s < num_states; ++s) {
    const std::int64_t expected = compact ? num_ids : blocks.first[s + 1] - blocks.first[s];
    TORCH_CHECK(block_steps[s].scalar_type() == at::kInt && block_steps[s].numel() == expected,
                "block_steps[", s, "] must be int32 with one count per ", compact ? "block id" : "block of its param");
  }
}

// The update loop of tensor t from `pick(param, grad, state dtype)`, or an error naming the state.
template <typename Fn, typename Pick>
std::vector<Fn> update_loops(at::TensorList params, at::TensorList grads, at::TensorList states, const char* name,
                             bool compact, Pick&& pick, bool compact_grads = false) {
  std::vector<Fn> loops_of(params.size());
  for (std::size_t t = 0; t < params.size(); ++t) {
    const std::size_t s = compact ? 0 : t;
    const std::size_t g = compact_grads ? 0 : t;
    const DType state = states.empty() ? dtype_code(params[t], "params", t) : dtype_code(states[s], name, s);
    loops_of[t] = pick(dtype_code(params[t], "params", t), dtype_code(grads[g], "grads", g), state);
    TORCH_CHECK(loops_of[t] != nullptr, name, "[", s, "] is ", states[s].scalar_type(),
                "; the state dtype must be the param dtype or float32");
  }
  return loops_of;
}

// The fp64 hyper-parameter table of an update (CPU memory: read, no sync).
const double* hyper_values(const at::Tensor& hyper, std::int64_t count) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.numel() == count &&
              hyper.is_contiguous(), "hyper must be a contiguous float64 CPU tensor of ", count, " values");
  return hyper.const_data_ptr<double>();
}

// One parallel loop over the selected ids: for each id in range, its count is advanced and
// `apply(local, t, start, state_start, step, length, i)` updates the block; t is the tensor, `start`
// the block's first element in it, `state_start` in its state (slab row i with compact state),
// i the id's position (the row of a compact grad),
// `local` a Local made afresh for each chunk of ids (a cache of per-block scalars). Ids out of
// range update nothing. Nothing at all when found_inf is set (an overflowed AMP step keeps even
// the counts).
struct NoLocal {};

template <typename Local = NoLocal, typename Apply>
void for_each_selected(const Blocks& blocks, at::TensorList block_steps, const at::Tensor& block_ids, bool compact,
                       const float* found_inf, Apply&& apply) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  std::vector<std::int32_t*> steps;
  for (const at::Tensor& s : block_steps) steps.push_back(s.data_ptr<std::int32_t>());
  const std::int64_t* ids = block_ids.data_ptr<std::int64_t>();
  const std::int64_t block_size = blocks.block_size;
  at::parallel_for(0, block_ids.numel(), blocks.grain(), [&](std::int64_t begin, std::int64_t end) {
    Local local{};
    for (std::int64_t i = begin; i < end; ++i) {
      const std::int64_t block = ids[i];
      if (block < 0 || block >= blocks.count()) continue;
      const std::size_t t = blocks.tensor_of(block);
      const std::int64_t start = blocks.start(t, block);
      const std::int32_t step = ++steps[compact ? 0 : t][compact ? i : block - blocks.first[t]];
      apply(local, t, start, compact ? i * block_size : start, step, blocks.length(t, block), i);
    }
  });
}

void sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList block_steps,
                       const at::Tensor& block_ids, const at::Tensor& hyper, std::int64_t block_size,
                       bool maximize, const std::optional<at::Tensor>& grad_coef,
                       const std::optional<at::Tensor>& found_inf, bool compact, bool compact_grads) {
  const Blocks blocks(params, block_size);
  check_state(params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, block_steps, blocks,
              block_ids, compact, compact_grads);
  const float* coef = optional_scalar(grad_coef, "grad_coef");
  const float* inf = optional_scalar(found_inf, "found_inf");
  const double* h = hyper_values(hyper, 5);  // [lr, beta1, beta2, eps, weight_decay]
  const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], weight_decay = h[4];
  const std::vector<AdamWBlockFn> update = update_loops<AdamWBlockFn>(
      params, grads, exp_avgs, "exp_avgs", compact,
      [&](DType p, DType g, DType s) { return loops().adamw_block(p, g, s, maximize); }, compact_grads);
  const float coef_value = coef != nullptr ? *coef : 1.0f;
  const std::vector<Operand> param = operands(params), grad = operands(grads),
                            exp_avg = operands(exp_avgs), exp_avg_sq = operands(exp_avg_sqs);
  // Blocks mostly share a step count: the scalars (two pow) are computed once per count seen in
  // a row within a chunk.
  struct Cached { std::int32_t step = 0; AdamWScalars scalars{}; };
  for_each_selected<Cached>(blocks, block_steps, block_ids, compact, inf,
                            [&](Cached& c, std::size_t t, std::int64_t start, std::int64_t state_start,
                                std::int32_t step, std::int64_t length, std::int64_t i) {
    if (step != c.step) {
      c.step = step;
      c.scalars = adamw_scalars(step, lr, beta1, beta2, eps, weight_decay, coef_value);
    }
    const std::size_t s = compact ? 0 : t;
    const void* g = compact_grads ? grad[0].at(i * block_size) : grad[t].at(start);
    update[t](param[t].at(start), g, exp_avg[s].at(state_start), exp_avg_sq[s].at(state_start), length,
              c.scalars);
  });
}

void sparse_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList block_steps, const at::Tensor& block_ids, const at::Tensor& hyper,
                     std::int64_t block_size, bool maximize, bool nesterov,
                     const std::optional<at::Tensor>& grad_coef, const std::optional<at::Tensor>& found_inf,
                     bool compact) {
  const Blocks blocks(params, block_size);
  const bool has_buffer = !momentum_buffers.empty();  // plain SGD (momentum 0) keeps no buffer
  if (has_buffer) {
    check_state(params, grads, {{"momentum_buffers", momentum_buffers}}, block_steps, blocks, block_ids, compact);
  } else {
    check_state(params, grads, {}, block_steps, blocks, block_ids, compact);
  }
  const float* coef = optional_scalar(grad_coef, "grad_coef");
  const float* inf = optional_scalar(found_inf, "found_inf");
  const double* h = hyper_values(hyper, 4);  // [lr, momentum, dampening, weight_decay]
  const std::vector<SGDBlockFn> update = update_loops<SGDBlockFn>(
      params, grads, momentum_buffers, "momentum_buffers", compact,
      [&](DType p, DType g, DType s) { return loops().sgd_block(p, g, s, maximize, nesterov, has_buffer); });
  const SGDScalars scalars{-h[0], h[1], 1.0 - h[2], h[3], false, coef != nullptr ? *coef : 1.0f};
  const std::vector<Operand> param = operands(params), grad = operands(grads), buffer = operands(momentum_buffers);
  for_each_selected(blocks, block_steps, block_ids, compact, inf,
                    [&](NoLocal&, std::size_t t, std::int64_t start, std::int64_t state_start, std::int32_t step,
                        std::int64_t length, std::int64_t) {
    SGDScalars block_scalars = scalars;
    block_scalars.first = step == 1;
    void* buf = has_buffer ? buffer[compact ? 0 : t].at(state_start) : nullptr;
    update[t](param[t].at(start), grad[t].at(start), buf, length, block_scalars);
  });
}

void sparse_lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList block_steps, const at::Tensor& block_ids, const at::Tensor& hyper,
                      std::int64_t block_size, bool maximize, const std::optional<at::Tensor>& grad_coef,
                      const std::optional<at::Tensor>& found_inf, bool compact) {
  const Blocks blocks(params, block_size);
  check_state(params, grads, {{"exp_avgs", exp_avgs}}, block_steps, blocks, block_ids, compact);
  const float* coef = optional_scalar(grad_coef, "grad_coef");
  const float* inf = optional_scalar(found_inf, "found_inf");
  const double* h = hyper_values(hyper, 4);  // [lr, beta1, beta2, weight_decay]
  const std::vector<LionBlockFn> update = update_loops<LionBlockFn>(
      params, grads, exp_avgs, "exp_avgs", compact,
      [&](DType p, DType g, DType s) { return loops().lion_block(p, g, s, maximize); });
  // In fp64, as lion-pytorch computes them on the host (Python floats).
  const LionScalars scalars{-h[0], 1.0 - h[0] * h[3], h[1], 1.0 - h[1], h[2], 1.0 - h[2],
                            coef != nullptr ? *coef : 1.0f};
  const std::vector<Operand> param = operands(params), grad = operands(grads), exp_avg = operands(exp_avgs);
  for_each_selected(blocks, block_steps, block_ids, compact, inf,
                    [&](NoLocal&, std::size_t t, std::int64_t start, std::int64_t state_start, std::int32_t,
                        std::int64_t length, std::int64_t) {
    update[t](param[t].at(start), grad[t].at(start), exp_avg[compact ? 0 : t].at(state_start), length, scalars);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_grad, CPU, m) {
  m.impl("native_block_sqnorms", &block_sqnorms);
  m.impl("native_sparse_adamw_step", &sparse_adamw_step);
  m.impl("native_sparse_sgd_step", &sparse_sgd_step);
  m.impl("native_sparse_lion_step", &sparse_lion_step);
}

}  // namespace sparse_grad::cpu
