// CPU kernel of sparse_grad::native_select_blocks (schema in sparse_grad/library.py): the k
// highest-scoring blocks of each segment, as ascending int64 ids. Ranking as the reference
// backend: higher score first, NaN above everything, -0.0 tied with +0.0, ties to the lower id.
//
// Each score and its id form one unique 64-bit key, so a partial selection (nth_element, O(n))
// of the keys is exactly the reference's choice; only the k chosen ids are then sorted.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace sparse_grad::cpu {
namespace {

// The float's bits as an unsigned integer in the float's order; NaN above +inf.
std::uint32_t ordered_bits(float score) {
  if (score != score) return 0xFFFFFFFFu;
  const float value = score + 0.0f;  // -0.0 -> +0.0
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Larger key = ranked first: by score, then by the lower offset within the segment.
std::uint64_t rank_key(float score, std::int64_t offset) {
  return (static_cast<std::uint64_t>(ordered_bits(score)) << 32) |
         (0xFFFFFFFFu - static_cast<std::uint32_t>(offset));
}

void select_segment(const float* scores, std::int64_t size, std::int64_t k, std::int64_t first,
                    std::int64_t* out) {
  if (k == size) {
    for (std::int64_t i = 0; i < size; ++i) out[i] = first + i;
    return;
  }
  std::vector<std::uint64_t> keys(size);
  for (std::int64_t i = 0; i < size; ++i) keys[i] = rank_key(scores[i], i);
  std::nth_element(keys.begin(), keys.begin() + k, keys.end(), std::greater<>());
  for (std::int64_t i = 0; i < k; ++i) out[i] = first + (0xFFFFFFFFu - (keys[i] & 0xFFFFFFFFu));
  std::sort(out, out + k);
}

at::Tensor select_blocks(const at::Tensor& scores, at::IntArrayRef segment_sizes,
                         at::IntArrayRef segment_ks) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 1 &&
              scores.is_contiguous(), "scores must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(segment_sizes.size() == segment_ks.size(), "segment_sizes has ", segment_sizes.size(),
              " entries but segment_ks ", segment_ks.size());
  const std::size_t segments = segment_sizes.size();
  std::vector<std::int64_t> first(segments + 1, 0), out_first(segments + 1, 0);
  for (std::size_t s = 0; s < segments; ++s) {
    TORCH_CHECK(segment_sizes[s] >= 0 && segment_sizes[s] <= 0xFFFFFFFFLL, "segment_sizes[", s,
                "] must be in [0, 2^32), got ", segment_sizes[s]);
    TORCH_CHECK(0 <= segment_ks[s] && segment_ks[s] <= segment_sizes[s], "segment_ks[", s,
                "] must be in [0, ", segment_sizes[s], "], got ", segment_ks[s]);
    first[s + 1] = first[s] + segment_sizes[s];
    out_first[s + 1] = out_first[s] + segment_ks[s];
  }
  TORCH_CHECK(first[segments] == scores.numel(), "segments cover ", first[segments],
              " blocks but scores has ", scores.numel());
  at::Tensor out = at::empty({out_first[segments]}, at::TensorOptions().dtype(at::kLong));
  const float* data = scores.data_ptr<float>();
  std::int64_t* ids = out.data_ptr<std::int64_t>();
  // Segments are independent; one thread per segment (grain: segments, not blocks).
  at::parallel_for(0, static_cast<std::int64_t>(segments), 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t s = begin; s < end; ++s) {
      select_segment(data + first[s], segment_sizes[s], segment_ks[s], first[s], ids + out_first[s]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_grad, CPU, m) {
  m.impl("native_select_blocks", &select_blocks);
}

}  // namespace sparse_grad::cpu
