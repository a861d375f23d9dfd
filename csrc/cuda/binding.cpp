// CUDA implementations of the sparse_grad::native_* schemas (defined in sparse_grad/library.py):
// argument checks, the per-call device tables, then the launchers of kernels.h.
//
// Per call, the per-tensor tables (addresses, element counts, first blocks, dtype codes) travel
// in one pinned, non-blocking host-to-device copy on the current stream. The block -> tensor map
// depends only on the layout, so it is built once per layout and cached.
// A CPU-only torch ships c10/cuda's headers but not this generated one, which only carries
// Windows export macros; without it this file still compiles there (CI checks it that way).
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

namespace k = sparse_grad::cuda_kernels;

// Global block numbering of a list of tensors (as sparse_grad.layout.BlockLayout).
struct Layout {
  Layout(std::vector<int64_t> numels_, int64_t block_size) : numels(std::move(numels_)) {
    block_offsets.reserve(numels.size() + 1);
    block_offsets.push_back(0);
    for (const int64_t n : numels) {
      // Not (n + block_size - 1) / block_size: that overflows for huge block sizes.
      block_offsets.push_back(block_offsets.back() + n / block_size + (n % block_size != 0));
    }
  }
  int64_t size() const { return static_cast<int64_t>(numels.size()); }
  int64_t num_blocks() const { return block_offsets.back(); }
  int64_t blocks_of(int64_t t) const { return block_offsets[t + 1] - block_offsets[t]; }

  std::vector<int64_t> numels;
  std::vector<int64_t> block_offsets;  // [T + 1]: first global block of each tensor, then the total
};

// The int32 block -> tensor map of recently used layouts. Built on the host and copied once per
// layout; a training step uses the same layout for the norm pass and the update, step after step.
// Maps are kept per stream: the copy that fills a map is ordered before every use on the stream
// it ran on, and freeing an evicted map is ordered after them, with no events to manage.
class BlockTensorMaps {
 public:
  at::Tensor get(const Layout& layout, int64_t block_size, const c10::cuda::CUDAStream& stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->stream == stream && it->block_size == block_size && it->numels == layout.numels) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return it->map;
      }
    }
    entries_.push_front(Entry{stream, block_size, layout.numels, build(layout, stream)});
    if (entries_.size() > kCapacity) entries_.pop_back();
    return entries_.front().map;
  }

 private:
  static constexpr size_t kCapacity = 32;

  struct Entry {
    c10::cuda::CUDAStream stream;
    int64_t block_size;
    std::vector<int64_t> numels;
    at::Tensor map;  // int32 [num_blocks] on the stream's device
  };

  // Copies on the current stream of its device: `stream`, as the callers get it.
  static at::Tensor build(const Layout& layout, const c10::cuda::CUDAStream& stream) {
    at::Tensor host = at::empty({layout.num_blocks()},
                                at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    int32_t* owner = host.data_ptr<int32_t>();
    for (int64_t t = 0; t < layout.size(); ++t) {
      std::fill(owner + layout.block_offsets[t], owner + layout.block_offsets[t + 1],
                static_cast<int32_t>(t));
    }
    return host.to(stream.device(), at::kInt, /*non_blocking=*/true);
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
};

BlockTensorMaps& block_tensor_maps() {
  // Never destroyed: freeing device tensors during interpreter exit can outlive the CUDA context.
  static auto* maps = new BlockTensorMaps();
  return *maps;
}

// rows x T int64 values: filled on the host, then moved to the device in one pinned,
// non-blocking copy on the current stream (torch's copy records the stream on the pinned
// buffer, so the caching host allocator keeps it until the copy has run).
class Table {
 public:
  Table(int64_t rows, int64_t width)
      : width_(width),
        host_(at::empty({rows * width},
                        at::TensorOptions().dtype(at::kLong).pinned_memory(true))) {}

  int64_t* row(int64_t r) { return host_.data_ptr<int64_t>() + r * width_; }

  // Returns the device copy; keep it alive until the kernels using it are queued.
  at::Tensor to(const at::Device& device) const {
    return host_.to(device, at::kLong, /*non_blocking=*/true);
  }

 private:
  int64_t width_;
  at::Tensor host_;
};

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }

// Checks raise RuntimeError with the CPU kernels' messages (csrc/cpu/ops.cpp), so that one test
// of bad input covers both devices.
k::DType dtype_code(const at::Tensor& t, const char* list, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::Float32;
    case at::kHalf: return k::DType::Float16;
    case at::kBFloat16: return k::DType::BFloat16;
    case at::kDouble: return k::DType::Float64;
    default: break;
  }
  TORCH_CHECK(false, list, "[", i, "] has unsupported dtype ", t.scalar_type(),
              "; supported: float32, float16, bfloat16, float64");
}

// `tensors` has `size` contiguous tensors on `device`.
void check_list(at::TensorList tensors, const char* list, size_t size, const at::Device& device) {
  TORCH_CHECK(tensors.size() == size, list, " has ", tensors.size(), " tensors, expected ", size);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, list, "[", i, "] is on ", tensors[i].device(),
                ", expected ", device);
    TORCH_CHECK(tensors[i].is_contiguous(), list, "[", i, "] is not contiguous");
  }
}

at::Tensor native_block_sqnorms(at::TensorList tensors, int64_t block_size) {
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  if (tensors.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "tensors[0] is not a CUDA tensor");
  check_list(tensors, "tensors", tensors.size(), device);
  const int64_t T = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> numels(T);
  std::vector<k::DType> dtypes(T);
  for (int64_t t = 0; t < T; ++t) {
    dtypes[t] = dtype_code(tensors[t], "tensors", t);
    numels[t] = tensors[t].numel();
  }
  const Layout layout(std::move(numels), block_size);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out =
      at::empty({layout.num_blocks()}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (layout.num_blocks() == 0) return out;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const at::Tensor block_tensor = block_tensor_maps().get(layout, block_size, stream);

  // Rows: addresses, element counts, first blocks, dtype codes.
  Table table(4, T);
  for (int64_t t = 0; t < T; ++t) {
    table.row(0)[t] = address(tensors[t].const_data_ptr());
    table.row(1)[t] = layout.numels[t];
    table.row(2)[t] = layout.block_offsets[t];
    table.row(3)[t] = static_cast<int64_t>(dtypes[t]);
  }
  const at::Tensor dev = table.to(device);
  const int64_t* d = dev.const_data_ptr<int64_t>();
  const k::BlockMap map{d + T, d + 2 * T, block_tensor.const_data_ptr<int32_t>(),
                        layout.num_blocks(), block_size};
  C10_CUDA_CHECK(
      k::launch_block_sqnorms(out.mutable_data_ptr<float>(), map, d, d + 3 * T, stream.stream()));
  return out;
}

// An optional one-element fp32 tensor on `device` (grad_coef, found_inf), read by the kernel.
const float* optional_scalar(const std::optional<at::Tensor>& t, const char* name,
                             const at::Device& device) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, name,
              " must be a one-element float32 tensor on ", device);
  return t->const_data_ptr<float>();
}

// The update ops' shared body: checks, tables, one launch per dtype triple. `moments` is the
// rule's first state list (AdamW's exp_avgs, SGD's momentum buffers (empty without momentum),
// Lion's exp_avgs), `second` AdamW's exp_avg_sqs (empty for the others); `hyper_size` the
// length of the rule's fp64 table.
void run_update(k::Rule rule, at::TensorList params, at::TensorList grads, at::TensorList moments,
                at::TensorList second, at::TensorList block_steps, const at::Tensor& block_ids,
                const at::Tensor& hyper, int64_t hyper_size, int64_t block_size, bool maximize,
                bool nesterov, const std::optional<at::Tensor>& grad_coef,
                const std::optional<at::Tensor>& found_inf, bool compact, bool compact_grads = false) {
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const size_t T = params.size();
  const size_t num_states = compact ? 1 : T;  // compact: one slab of moments, one count per id
  const at::Device device = block_ids.device();
  TORCH_CHECK(device.is_cuda() && block_ids.scalar_type() == at::kLong && block_ids.dim() == 1 &&
                  block_ids.is_contiguous(),
              "block_ids must be a contiguous 1-D int64 CUDA tensor");
  const bool has_moments = !moments.empty();
  check_list(params, "params", T, device);
  check_list(grads, "grads", compact_grads ? 1 : T, device);
  if (has_moments || rule != k::Rule::SGD) check_list(moments, "moments", num_states, device);
  if (rule == k::Rule::AdamW) check_list(second, "exp_avg_sqs", num_states, device);
  check_list(block_steps, "block_steps", num_states, device);
  const int64_t num_ids = block_ids.numel();
  TORCH_CHECK(!compact_grads || T == 0 || grads[0].numel() == num_ids * block_size,
              "compact grads must be one slab of block_size elements per block id");
  if (compact) {
    for (const at::TensorList* list : {&moments, &second}) {
      TORCH_CHECK(list->empty() || (*list)[0].numel() == num_ids * block_size,
                  "compact state slabs must hold block_size elements per block id");
    }
    TORCH_CHECK(block_steps[0].scalar_type() == at::kInt && block_steps[0].numel() == num_ids,
                "compact block_steps[0] must be int32 with one count per block id");
  }
  const float* coef = optional_scalar(grad_coef, "grad_coef", device);
  const float* inf = optional_scalar(found_inf, "found_inf", device);
  TORCH_CHECK(hyper.device() == device && hyper.scalar_type() == at::kDouble &&
                  hyper.numel() == hyper_size && hyper.is_contiguous(),
              "hyper must be a contiguous float64 tensor of ", hyper_size, " values on ", device);
  if (T == 0) return;

  std::vector<int64_t> numels(T);
  for (size_t t = 0; t < T; ++t) numels[t] = params[t].numel();
  const Layout layout(std::move(numels), block_size);
  std::vector<int64_t> combos(T);
  std::vector<std::array<k::DType, 3>> distinct;  // (param, grad, state) triples, first seen first
  for (size_t t = 0; t < T; ++t) {
    const size_t s = compact ? 0 : t;  // the state tensors of params[t]
    const size_t g = compact_grads ? 0 : t;  // the grad tensor of params[t]
    TORCH_CHECK(compact_grads || grads[t].numel() == params[t].numel(), "grads[", t, "] has ",
                grads[t].numel(), " elements, params[", t, "] ", params[t].numel());
    if (!compact) {
      for (const at::TensorList* list : {&moments, &second}) {
        TORCH_CHECK(list->empty() || (*list)[t].numel() == params[t].numel(), "tensor ", t,
                    " of the state has ", (*list)[t].numel(), " elements, params[", t, "] ",
                    params[t].numel());
      }
      TORCH_CHECK(block_steps[t].scalar_type() == at::kInt &&
                      block_steps[t].numel() == layout.blocks_of(static_cast<int64_t>(t)),
                  "block_steps[", t, "] must be int32 with one count per block of params[", t, "]");
    }
    TORCH_CHECK(second.empty() || moments[s].scalar_type() == second[s].scalar_type(), "exp_avgs[", s,
                "] and exp_avg_sqs[", s, "] have different dtypes");
    const k::DType param = dtype_code(params[t], "params", t);
    const k::DType grad = dtype_code(grads[g], "grads", g);
    const k::DType state = has_moments ? dtype_code(moments[s], "moments", s) : param;
    TORCH_CHECK(state == param || state == k::DType::Float32, "the state of params[", t, "] is ",
                moments[s].scalar_type(), "; the state dtype must be the param dtype or float32");
    combos[t] = k::dtype_combo(param, grad, state);
    const std::array<k::DType, 3> triple{param, grad, state};
    if (std::find(distinct.begin(), distinct.end(), triple) == distinct.end()) {
      distinct.push_back(triple);
    }
  }
  if (num_ids == 0 || layout.num_blocks() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const at::Tensor block_tensor = block_tensor_maps().get(layout, block_size, stream);

  // Rows: params, grads, moments, second moments, block_steps addresses (0: no such state),
  // element counts, first blocks, dtype combos.
  const int64_t width = static_cast<int64_t>(T);
  Table table(8, width);
  for (size_t t = 0; t < T; ++t) {
    const size_t s = compact ? 0 : t;
    table.row(0)[t] = address(params[t].mutable_data_ptr());
    table.row(1)[t] = address(grads[compact_grads ? 0 : t].const_data_ptr());
    table.row(2)[t] = has_moments ? address(moments[s].mutable_data_ptr()) : 0;
    table.row(3)[t] = second.empty() ? 0 : address(second[s].mutable_data_ptr());
    table.row(4)[t] = address(block_steps[s].mutable_data_ptr());
    table.row(5)[t] = layout.numels[t];
    table.row(6)[t] = layout.block_offsets[t];
    table.row(7)[t] = combos[t];
  }
  const at::Tensor dev = table.to(device);
  const int64_t* d = dev.const_data_ptr<int64_t>();
  const k::AdamwTables tables{d, d + width, d + 2 * width, d + 3 * width, d + 4 * width,
                              d + 7 * width};
  const k::BlockMap map{d + 5 * width, d + 6 * width, block_tensor.const_data_ptr<int32_t>(),
                        layout.num_blocks(), block_size};
  const k::AdamwHyper scalars{hyper.const_data_ptr<double>(), maximize, coef, inf, compact, rule, nesterov,
                              has_moments, compact_grads};
  for (const auto& triple : distinct) {
    C10_CUDA_CHECK(k::launch_sparse_adamw(tables, map, block_ids.const_data_ptr<int64_t>(), num_ids,
                                          triple[0], triple[1], triple[2], scalars, stream.stream()));
  }
}

void native_sparse_adamw_step(at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList block_steps, const at::Tensor& block_ids,
                              const at::Tensor& hyper, int64_t block_size, bool maximize,
                              const std::optional<at::Tensor>& grad_coef,
                              const std::optional<at::Tensor>& found_inf, bool compact, bool compact_grads) {
  run_update(k::Rule::AdamW, params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, 5,
             block_size, maximize, false, grad_coef, found_inf, compact, compact_grads);
}

void native_sparse_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList block_steps, const at::Tensor& block_ids, const at::Tensor& hyper,
                            int64_t block_size, bool maximize, bool nesterov,
                            const std::optional<at::Tensor>& grad_coef,
                            const std::optional<at::Tensor>& found_inf, bool compact) {
  run_update(k::Rule::SGD, params, grads, momentum_buffers, {}, block_steps, block_ids, hyper, 4, block_size,
             maximize, nesterov, grad_coef, found_inf, compact);
}

void native_sparse_lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList block_steps, const at::Tensor& block_ids, const at::Tensor& hyper,
                             int64_t block_size, bool maximize, const std::optional<at::Tensor>& grad_coef,
                             const std::optional<at::Tensor>& found_inf, bool compact) {
  run_update(k::Rule::Lion, params, grads, exp_avgs, {}, block_steps, block_ids, hyper, 4, block_size, maximize,
             false, grad_coef, found_inf, compact);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_grad, CUDA, m) {
  m.impl("native_block_sqnorms", TORCH_FN(native_block_sqnorms));
  m.impl("native_sparse_adamw_step", TORCH_FN(native_sparse_adamw_step));
  m.impl("native_sparse_sgd_step", TORCH_FN(native_sparse_sgd_step));
  m.impl("native_sparse_lion_step", TORCH_FN(native_sparse_lion_step));
}
