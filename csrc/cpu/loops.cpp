// Instantiates loops.inc for each instruction set and picks one at run time.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "loops.h"

namespace sparse_grad::cpu {

namespace baseline {
#include "loops.inc"
}  // namespace baseline

// GCC compiles the same source for wider vector units under a target pragma; each copy lives in
// its own namespace, so no inline function is shared between instruction sets.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPARSE_GRAD_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "loops.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace avx512 {
#include "loops.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

constexpr Loops kBaseline{"default", &baseline::sum_squares_fn, &baseline::adamw_block_fn,
                          &baseline::sgd_block_fn, &baseline::lion_block_fn};
#ifdef SPARSE_GRAD_X86_VARIANTS
constexpr Loops kAvx2{"avx2", &avx2::sum_squares_fn, &avx2::adamw_block_fn, &avx2::sgd_block_fn,
                      &avx2::lion_block_fn};
constexpr Loops kAvx512{"avx512", &avx512::sum_squares_fn, &avx512::adamw_block_fn, &avx512::sgd_block_fn,
                        &avx512::lion_block_fn};
#endif

const Loops& choose() {
  const char* asked = std::getenv("SPARSE_GRAD_CPU_ISA");
  const std::string name = asked ? asked : "";
#ifdef SPARSE_GRAD_X86_VARIANTS
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq");
  if (name.empty()) return has_avx512 ? kAvx512 : has_avx2 ? kAvx2 : kBaseline;
  if (name == "avx512" && has_avx512) return kAvx512;
  if (name == "avx2" && has_avx2) return kAvx2;
#endif
  if (name.empty() || name == "default") return kBaseline;
  throw std::runtime_error("SPARSE_GRAD_CPU_ISA=" + name +
                           " is not available on this CPU or build (use default, avx2 or avx512)");
}

}  // namespace

const Loops& loops() {
  static const Loops& chosen = choose();
  return chosen;
}

}  // namespace sparse_grad::cpu
