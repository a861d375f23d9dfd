// Element types the CPU kernels read and write, and their exact conversions to and from the
// compute type. Written branch-free so that the element loops vectorize.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

namespace sparse_grad::cpu {

enum class DType : std::uint8_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Storage of a 16-bit float: conversions below give it its meaning.
struct BFloat16Bits { std::uint16_t bits; };
struct Float16Bits { std::uint16_t bits; };

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename C> inline C to_compute(float x) { return static_cast<C>(x); }
template <typename C> inline C to_compute(double x) { return static_cast<C>(x); }
template <typename C> inline C to_compute(BFloat16Bits x) {
  return static_cast<C>(bits_to_float(static_cast<std::uint32_t>(x.bits) << 16));
}
template <typename C> inline C to_compute(Float16Bits x) {
  return static_cast<C>(c10::detail::fp16_ieee_to_fp32_value(x.bits));
}

// Round to nearest even, as torch's .to(dtype) does (for bf16: c10::BFloat16, NaN -> 0x7FC0).
template <typename T> struct Store;
template <> struct Store<float> {
  static float from(float x) { return x; }
  static float from(double x) { return static_cast<float>(x); }
};
template <> struct Store<double> {
  static double from(double x) { return x; }
  static double from(float x) { return x; }
};
template <> struct Store<BFloat16Bits> {
  static BFloat16Bits from(float x) {
    std::uint32_t u = float_to_bits(x);
    std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return {static_cast<std::uint16_t>(x != x ? 0x7FC0u : rounded)};
  }
  static BFloat16Bits from(double x) { return from(static_cast<float>(x)); }
};
template <> struct Store<Float16Bits> {
  static Float16Bits from(float x) { return {c10::detail::fp16_ieee_from_fp32_value(x)}; }
  static Float16Bits from(double x) { return from(static_cast<float>(x)); }
};

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<double>() { return DType::kFloat64; }
template <> constexpr DType dtype_of<BFloat16Bits>() { return DType::kBFloat16; }
template <> constexpr DType dtype_of<Float16Bits>() { return DType::kFloat16; }

// Calls f(T{}) with the storage type T of dtype.
template <typename F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(BFloat16Bits{});
    case DType::kFloat16: return f(Float16Bits{});
    case DType::kFloat32: break;
  }
  return f(float{});
}

// fp32 math for 16/32-bit storage, fp64 for fp64 (as the reference backend).
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

}  // namespace sparse_grad::cpu
