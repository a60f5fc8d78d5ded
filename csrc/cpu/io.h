// Vectorized loads and stores of one kernel step, shared by the CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>

#include "../act.h"

namespace fastres {

// One step of a scalar_t kernel: Vectorized<T>::size() elements held as kParts opmath vectors.
template <typename T>
struct Io {
  using O = at::opmath_type<T>;
  using V = Vec<O>;
  static constexpr int64_t kStep = Vec<T>::size();
  static constexpr int kParts = kStep / V::size();
  using Pack = std::array<V, kParts>;

  static C10_ALWAYS_INLINE int64_t lanes(int64_t n, int k) { return std::clamp<int64_t>(n - k * V::size(), 0, V::size()); }

  // The first n elements at p (the rest zero).
  static C10_ALWAYS_INLINE Pack load(const T* p, int64_t n) {
    Vec<T> v = n == kStep ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
    if constexpr (kParts == 1) {
      return {v};
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(v);
      return {a, b};
    }
  }

  static C10_ALWAYS_INLINE void store(T* p, const Pack& v, int64_t n) {
    Vec<T> w;
    if constexpr (kParts == 1) {
      w = v[0];
    } else {
      w = at::vec::convert_from_float<T>(v[0], v[1]);
    }
    n == kStep ? w.store(p) : w.store(p, n);
  }

  // v rounded to T and back: what a store and a load of v would give.
  static C10_ALWAYS_INLINE Pack rounded(const Pack& v) {
    if constexpr (kParts == 1) {
      return v;
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
      return {a, b};
    }
  }

  // Per-channel values for elements [j, j + n) of a run: a vector load along a channels_last
  // row (inner), a broadcast of *p along an NCHW plane.
  static C10_ALWAYS_INLINE Pack chan(const O* p, bool inner, int64_t j, int64_t n) {
    Pack v;
    for (int k = 0; k < kParts; ++k) v[k] = inner ? V::loadu(p + j + k * V::size(), lanes(n, k)) : V(*p);
    return v;
  }
};

}  // namespace fastres
