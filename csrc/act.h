// Activation math shared by the CPU and CUDA kernels.
//
// Each formula is written once, templated on T: a scalar (float/double, host or device) or, on the
// CPU, an at::vec::Vectorized. The few primitives the formulas use (vmax, vmin, vexp, where) have
// both overloads here, so the formulas never know which one they run on.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define FASTRES_HD __host__ __device__ __forceinline__
#else
#define FASTRES_HD inline
#include <ATen/cpu/vec/vec.h>
#endif
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

namespace fastres {

enum class Act { Identity, Relu, Relu6, Silu };

// ---- scalar primitives (NaN-propagating like ATen's relu/clamp) ---------------------------------
template <typename T> FASTRES_HD T vmax(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T> FASTRES_HD T vmin(T a, T b) { return (a != a || a < b) ? a : b; }
template <typename T> FASTRES_HD T vexp(T a) { return std::exp(a); }
template <typename T> FASTRES_HD T where(bool keep, T a, T b) { return keep ? a : b; }

// ---- the same primitives on CPU vectors ----------------------------------------------------------
#if !defined(__CUDACC__)
template <typename T> using Vec = at::vec::Vectorized<T>;
template <typename T> inline Vec<T> vmax(const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }
template <typename T> inline Vec<T> vmin(const Vec<T>& a, const Vec<T>& b) { return at::vec::minimum(a, b); }
template <typename T> inline Vec<T> vexp(const Vec<T>& a) { return a.exp(); }
template <typename T> inline Vec<T> where(const Vec<T>& keep, const Vec<T>& a, const Vec<T>& b) {
  return Vec<T>::blendv(b, a, keep);
}
#endif

// ---- the activations -----------------------------------------------------------------------------
template <Act A, typename T>
FASTRES_HD T act_forward(T z) {
  if constexpr (A == Act::Relu) {
    return vmax(z, T(0));
  } else if constexpr (A == Act::Relu6) {
    return vmin(vmax(z, T(0)), T(6));
  } else if constexpr (A == Act::Silu) {
    return z / (T(1) + vexp(T(0) - z));
  } else {
    return z;
  }
}

// dL/dz from dL/dy = g. `v` is the activation's output y for relu/relu6 (the mask is read from
// it, as ATen does) and its input z for silu; identity ignores it.
template <Act A, typename T>
FASTRES_HD T act_backward(T g, T v) {
  if constexpr (A == Act::Relu) {
    return where(v > T(0), g, T(0));
  } else if constexpr (A == Act::Relu6) {
    return where((v > T(0)) & (v < T(6)), g, T(0));
  } else if constexpr (A == Act::Silu) {
    T s = T(1) / (T(1) + vexp(T(0) - v));
    return g * (s * (T(1) + v * (T(1) - s)));
  } else {
    return g;
  }
}

// Whether act_backward reads the pre-activation z (else the saved output y). Without a saved
// output, the relu family's y is recomputed from z and rounded as the forward stored it (z < 6 can
// round to y = 6).
constexpr bool needs_input(Act a) { return a == Act::Silu; }
// Whether rounding dL/dz to the input dtype is exact: a masked copy of dL/dy.
constexpr bool masks_only(Act a) { return a != Act::Silu; }

// ---- host-side selection -------------------------------------------------------------------------
inline Act parse_act(const std::string& name) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK(false, "fastres: unknown activation '", name, "'; expected identity, relu, relu6 or silu");
}

// Calls f(std::integral_constant<Act, a>{}) so kernels can take the activation as a template argument.
template <typename F>
decltype(auto) dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Relu6: return f(std::integral_constant<Act, Act::Relu6>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
    default: return f(std::integral_constant<Act, Act::Identity>{});
  }
}

}  // namespace fastres

// Runs the statements `...` with scalar_t bound to `dtype` (fp32, fp64, fp16, bf16).
#define FASTRES_DISPATCH_TYPES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, [&] { __VA_ARGS__; })

// Likewise, with `constexpr Act kAct` bound to the activation `act` as well.
#define FASTRES_DISPATCH(dtype, act, name, ...)                                              \
  FASTRES_DISPATCH_TYPES(dtype, name, ::fastres::dispatch_act(act, [&](auto act_c_) {        \
    constexpr ::fastres::Act kAct = decltype(act_c_)::value;                                \
    __VA_ARGS__;                                                                             \
  }))
