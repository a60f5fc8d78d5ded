// Tiled traversal shared by the CPU kernels: a tensor in its own memory format (Layout, bn_act.h)
// walked tile by tile in parallel, each tile in vector steps, and per-tile partial sums, so that
// reductions do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "../bn_act.h"
#include "io.h"

namespace fastres {

// Per-channel sums over one tile: an NCHW plane sums in registers into one value, a channels_last
// tile sums each of its C channels in memory (the tile's partial row).
template <typename T>
struct TileSum {
  using IO = Io<T>;
  typename IO::O* row;
  bool inner;
  typename IO::Pack acc;

  TileSum(typename IO::O* row_, bool inner_) : row(row_), inner(inner_) { acc.fill(typename IO::V(0)); }

  C10_ALWAYS_INLINE void add(const typename IO::Pack& v, int64_t j, int64_t n) {
    for (int k = 0; k < IO::kParts; ++k) {
      const int64_t m = IO::lanes(n, k);
      if (inner) {
        typename IO::O* p = row + j + k * IO::V::size();
        (IO::V::loadu(p, m) + v[k]).store(p, m);
      } else {
        acc[k] = acc[k] + (m == IO::V::size() ? v[k] : IO::V::set(typename IO::V(0), v[k], m));
      }
    }
  }

  void finish() {
    if (inner) return;
    for (int k = 0; k < IO::kParts; ++k)
      *row += at::vec::vec_reduce_all([](auto& a, auto& b) { return a + b; }, acc[k]);
  }
};

// Calls f(t) for every tile, tiles in parallel.
template <typename F>
void for_each_tile(const Layout& L, F&& f) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(L.tile_elems(), 1));
  at::parallel_for(0, L.tiles(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t);
  });
}

// Calls f(i, xi, j, n) over tile t in steps of at most Io<T>::kStep elements: n elements at flat
// offset i (xi in x, whose channels_last pixels may be L.xs apart), position j of their run (the
// NCHW plane, or the channels_last row, so j is the channel).
// Kernels pass f capturing by value (but for the partial sums it adds to): the pointers and
// sizes it reads are then copies that stay in registers. Captured by reference they are reloaded
// through the closure at every step, which made bn_act_backward 1.5x slower.
template <typename T, typename F>
C10_ALWAYS_INLINE void for_each_step(const Layout& L, int64_t t, F&& f) {
  constexpr int64_t kStep = Io<T>::kStep;
  auto run = [&](int64_t off, int64_t xoff, int64_t len) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int64_t j = 0; j < len; j += kStep) f(off + j, xoff + j, j, std::min(kStep, len - j));
  };
  if (!L.cl) return run(t * L.HW, t * L.HW, L.HW);
  for (int64_t p = t * L.rows, end = std::min(p + L.rows, L.pixels()); p < end; ++p) run(p * L.C, p * L.xs, L.C);
}

template <typename T>
const T* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

}  // namespace fastres
