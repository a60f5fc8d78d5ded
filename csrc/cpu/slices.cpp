// CPU kernels of fastres_native::residual_act_ and split_add (see slices.h): runs of contiguous
// elements in parallel, each in vector steps, math in opmath (fp32 for fp16/bf16), rounded once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../act.h"
#include "../slices.h"
#include "io.h"

namespace fastres {
namespace {

// Calls f(r) for runs r in [0, count), in parallel chunks of about GRAIN_SIZE elements.
template <typename F>
void for_each_run(int64_t count, int64_t len, F&& f) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(len, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

template <typename T, Act A>
void residual_act_kernel(const ResidualCall& c, T* out) {
  using IO = Io<T>;
  const T* res = c.residual.const_data_ptr<T>();
  const Runs o = c.out, r = c.res;
  for_each_run(o.count, o.len, [=](int64_t run) {
    T* po = out + run * o.stride;
    const T* pr = res + run * r.stride;
    for (int64_t j = 0; j < r.len; j += IO::kStep) {
      const int64_t n = std::min(IO::kStep, r.len - j);
      auto v = IO::load(po + j, n), w = IO::load(pr + j, n);
      for (int k = 0; k < IO::kParts; ++k) v[k] = act_forward<A>(v[k] + w[k]);
      IO::store(po + j, v, n);
    }
    if constexpr (A != Act::Identity) {
      for (int64_t j = r.len; j < o.len; j += IO::kStep) {
        const int64_t n = std::min(IO::kStep, o.len - j);
        auto v = IO::load(po + j, n);
        for (int k = 0; k < IO::kParts; ++k) v[k] = act_forward<A>(v[k]);
        IO::store(po + j, v, n);
      }
    }
  });
}

void residual_act_cpu(const Tensor& out, const Tensor& residual, c10::string_view act) {
  ResidualCall c = residual_call(out, residual, act);
  FASTRES_DISPATCH(out.scalar_type(), c.act, "residual_act_cpu",
                   residual_act_kernel<scalar_t, kAct>(c, out.mutable_data_ptr<scalar_t>()));
}

template <typename T>
void split_add_kernel(const SplitCall& c, T* slot) {
  using IO = Io<T>;
  const T* x = c.xs.const_data_ptr<T>();
  const T* y = c.ys.const_data_ptr<T>();
  T* sum = c.out.mutable_data_ptr<T>();
  const Runs rs = c.slot, rx = c.x, ry = c.y, ro = c.sum;
  for_each_run(rs.count, rs.len, [=](int64_t run) {
    const T* px = x + run * rx.stride;
    const T* py = y + run * ry.stride;
    T* pslot = slot + run * rs.stride;
    T* psum = sum + run * ro.stride;
    for (int64_t j = 0; j < rs.len; j += IO::kStep) {
      const int64_t n = std::min(IO::kStep, rs.len - j);
      const Vec<T> yv = n == IO::kStep ? Vec<T>::loadu(py + j) : Vec<T>::loadu(py + j, n);
      n == IO::kStep ? yv.store(pslot + j) : yv.store(pslot + j, n);
      auto v = IO::load(px + j, n), w = IO::load(py + j, n);
      for (int k = 0; k < IO::kParts; ++k) v[k] = v[k] + w[k];
      IO::store(psum + j, v, n);
    }
  });
}

Tensor split_add_cpu(const Tensor& x, const Tensor& y, const Tensor& slot) {
  SplitCall c = split_call(x, y, slot);
  FASTRES_DISPATCH_TYPES(slot.scalar_type(), "split_add_cpu",
                         split_add_kernel<scalar_t>(c, slot.mutable_data_ptr<scalar_t>()));
  return c.out;
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CPU, m) {
  m.impl("residual_act_", &fastres::residual_act_cpu);
  m.impl("split_add", &fastres::split_add_cpu);
}
