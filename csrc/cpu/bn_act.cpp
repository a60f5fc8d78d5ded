// CPU kernels of fastres_native::bn_act, bn_act_backward and batch_stats.
//
// Every kernel walks the input in its own memory format (see Layout in bn_act.h): an NCHW plane
// broadcasts its channel's scale/shift, a channels_last row loads them as vectors. Data is loaded
// as at::vec::Vectorized<scalar_t> and computed in opmath vectors (fp32 for fp16/bf16); tiles run
// in parallel, and reductions write one partial row per tile that ATen sums at the end, so
// results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../act.h"
#include "../bn_act.h"
#include "io.h"
#include "tiles.h"

namespace fastres {
namespace {

// Channels_last elements per tile (rows = this / C): small enough that a tile's partial
// sums stay in cache, large enough to amortise the per-tile work.
constexpr int64_t kTileElems = 16384;

// ---- bn_act --------------------------------------------------------------------------------------
template <typename T, Act A>
void bn_act_kernel(const Inputs& in, Tensor& y) {
  using IO = Io<T>;
  using O = typename IO::O;
  const Layout& L = in.layout;
  const T* x = in.x.const_data_ptr<T>();
  const T* r = ptr_or_null<T>(in.residual);
  const O* scale = in.scale.const_data_ptr<O>();
  const O* shift = in.shift.const_data_ptr<O>();
  T* out = y.mutable_data_ptr<T>();
  for_each_tile(L, [&](int64_t t) {
    const int64_t c = L.cl ? 0 : t % L.C;
    for_each_step<T>(L, t, [=](int64_t i, int64_t xi, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      auto v = IO::load(x + xi, n);
      auto s = IO::chan(scale + c, L.cl, j, n), b = IO::chan(shift + c, L.cl, j, n);
      typename IO::Pack rv;
      if (r) rv = IO::load(r + i, n);
      for (int k = 0; k < IO::kParts; ++k) {
        auto z = v[k] * s[k] + b[k];
        v[k] = act_forward<A>(r ? z + rv[k] : z);
      }
      IO::store(out + i, v, n);
    });
  });
}

Tensor bn_act_cpu(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                  const OptTensor& invstd, const OptTensor& residual, c10::string_view act) {
  // a channel slice of a channels_last tensor (DenseNet's prefix of its features) is read in place
  Inputs in = prepare(x, weight, bias, mean, invstd, residual, kTileElems, /*sliced_x=*/true);
  Tensor y = in.layout.xs == in.layout.C ? at::empty_like(in.x)   // x's own strides (also when empty)
                                         : at::empty(in.x.sizes(), in.x.options().memory_format(in.format));
  FASTRES_DISPATCH(x.scalar_type(), parse_act(std::string(act)), "bn_act_cpu", bn_act_kernel<scalar_t, kAct>(in, y));
  return y;
}

// ---- bn_act_backward -----------------------------------------------------------------------------
// The two passes of Backward (bn_act.h); each tile's per-channel vectors start at offset c.
template <typename T, Act A>
void bn_act_backward_kernel(const Inputs& in, const Tensor& grad, const Tensor& saved_out, Backward& g) {
  using IO = Io<T>;
  using O = typename IO::O;
  using Pack = typename IO::Pack;
  const Layout& L = in.layout;
  const T* dy = grad.const_data_ptr<T>();
  const T* x = in.x.const_data_ptr<T>();
  const T* r = ptr_or_null<T>(in.residual);
  const T* y = ptr_or_null<T>(saved_out);
  const O* scale = in.scale.const_data_ptr<O>();
  const O* shift = in.shift.const_data_ptr<O>();
  const O* mean = in.mean.const_data_ptr<O>();
  T* gx = g.direct_gx() ? g.gx.mutable_data_ptr<T>() : nullptr;
  T* gres = g.gres.defined() ? g.gres.mutable_data_ptr<T>() : nullptr;
  O* s0 = g.s0_partial.defined() ? g.s0_partial.mutable_data_ptr<O>() : nullptr;
  O* s1 = g.s1_partial.defined() ? g.s1_partial.mutable_data_ptr<O>() : nullptr;

  // dL/dz for the step (i, j, n); xv holds x there when the activation is recomputed from it
  // (silu's z; the relu family's output, as the forward rounded it, when none was saved).
  const bool recompute = A != Act::Identity && (needs_input(A) || !y);
  auto grad_z = [=](int64_t i, int64_t j, int64_t n, int64_t c, const Pack& xv) C10_ALWAYS_INLINE_ATTRIBUTE {
    Pack gz = IO::load(dy + i, n);
    if constexpr (A != Act::Identity) {
      if (recompute) {
        auto s = IO::chan(scale + c, L.cl, j, n), b = IO::chan(shift + c, L.cl, j, n);
        Pack v, rv;
        if (r) rv = IO::load(r + i, n);
        for (int k = 0; k < IO::kParts; ++k) {
          auto z = xv[k] * s[k] + b[k];
          v[k] = r ? z + rv[k] : z;
        }
        if constexpr (!needs_input(A)) {
          for (int k = 0; k < IO::kParts; ++k) v[k] = act_forward<A>(v[k]);
          v = IO::rounded(v);
        }
        for (int k = 0; k < IO::kParts; ++k) gz[k] = act_backward<A>(gz[k], v[k]);
      } else {
        Pack v = IO::load(y + i, n);
        for (int k = 0; k < IO::kParts; ++k) gz[k] = act_backward<A>(gz[k], v[k]);
      }
    }
    return gz;
  };

  const bool load_x = recompute || s1;
  for_each_tile(L, [&](int64_t t) {
    const int64_t c = L.cl ? 0 : t % L.C, row = t * L.width();
    TileSum<T> sum0(s0 ? s0 + row : nullptr, L.cl), sum1(s1 ? s1 + row : nullptr, L.cl);
    for_each_step<T>(L, t, [=, &sum0, &sum1](int64_t i, int64_t xi, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      Pack xv;
      if (load_x) xv = IO::load(x + xi, n);
      Pack gz = grad_z(i, j, n, c, xv);
      if (gres) IO::store(gres + i, gz, n);
      if (s0) sum0.add(gz, j, n);
      if (s1) {
        auto m = IO::chan(mean + c, L.cl, j, n);
        Pack p;
        for (int k = 0; k < IO::kParts; ++k) p[k] = gz[k] * (xv[k] - m[k]);
        sum1.add(p, j, n);
      }
      if (gx) {
        auto s = IO::chan(scale + c, L.cl, j, n);
        for (int k = 0; k < IO::kParts; ++k) gz[k] = gz[k] * s[k];
        IO::store(gx + i, gz, n);
      }
    });
    if (s0) sum0.finish();
    if (s1) sum1.finish();
  });

  g.reduce(in);
  if (!g.second_pass()) return;
  T* gxt = g.gx.mutable_data_ptr<T>();
  const O* k0 = g.k0.const_data_ptr<O>();
  const O* k1 = g.k1.const_data_ptr<O>();
  // pass 1 stored dL/dz as the residual's grad: exactly, for a mask; read it instead of dL/dy and y
  const T* gz_saved = masks_only(A) ? gres : nullptr;
  for_each_tile(L, [&](int64_t t) {
    const int64_t c = L.cl ? 0 : t % L.C;
    for_each_step<T>(L, t, [=](int64_t i, int64_t xi, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      Pack xv = IO::load(x + xi, n);
      Pack gz = gz_saved ? IO::load(gz_saved + i, n) : grad_z(i, j, n, c, xv);
      auto s = IO::chan(scale + c, L.cl, j, n), m = IO::chan(mean + c, L.cl, j, n);
      auto a0 = IO::chan(k0 + c, L.cl, j, n), a1 = IO::chan(k1 + c, L.cl, j, n);
      for (int k = 0; k < IO::kParts; ++k) gz[k] = s[k] * (gz[k] - a0[k] - (xv[k] - m[k]) * a1[k]);
      IO::store(gxt + i, gz, n);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cpu(
    const Tensor& grad_, const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
    const OptTensor& invstd, const OptTensor& residual, const OptTensor& out, c10::string_view act_name,
    bool training, const c10::List<bool>& output_mask) {
  const Act act = parse_act(std::string(act_name));
  Inputs in = prepare(x, weight, bias, mean, invstd, residual, kTileElems);
  Tensor grad = in.like_x(grad_, "grad");
  Tensor saved_out = saved_output(in, out, act == Act::Relu || act == Act::Relu6);
  Backward g(in, output_mask, weight, bias, training);
  FASTRES_DISPATCH(x.scalar_type(), act, "bn_act_backward_cpu",
                   bn_act_backward_kernel<scalar_t, kAct>(in, grad, saved_out, g));
  return g.result(grad_, weight, bias);
}

// ---- batch_stats ---------------------------------------------------------------------------------
// Two passes per tile (the second reads it from cache): an approximate mean, then the sums of the
// deviations from it and of their squares, which TileStats::merge turns into exact statistics.
template <typename T>
void batch_stats_kernel(const Inputs& in, TileStats& st) {
  using IO = Io<T>;
  using O = typename IO::O;
  const Layout& L = in.layout;
  const T* x = in.x.const_data_ptr<T>();
  for_each_tile(L, [&](int64_t t) {
    const int64_t row = t * L.width();
    O* mean = st.mean.mutable_data_ptr<O>() + row;
    TileSum<T> sum(mean, L.cl), dev(st.dev.mutable_data_ptr<O>() + row, L.cl), sq(st.m2.mutable_data_ptr<O>() + row, L.cl);
    for_each_step<T>(L, t, [=, &sum](int64_t, int64_t xi, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      sum.add(IO::load(x + xi, n), j, n);
    });
    sum.finish();
    const O inv = O(1) / O(L.count(t));
    for (int64_t k = 0; k < L.width(); ++k) mean[k] *= inv;
    for_each_step<T>(L, t, [=, &dev, &sq](int64_t, int64_t xi, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      auto d = IO::load(x + xi, n), m = IO::chan(mean, L.cl, j, n);
      typename IO::Pack d2;
      for (int k = 0; k < IO::kParts; ++k) {
        d[k] = d[k] - m[k];
        d2[k] = d[k] * d[k];
      }
      dev.add(d, j, n);
      sq.add(d2, j, n);
    });
    dev.finish();
    sq.finish();
  });
}

std::tuple<Tensor, Tensor> batch_stats_cpu(const Tensor& x) {
  Inputs in = prepare(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, kTileElems,
                      /*sliced_x=*/true);
  TileStats st(in);
  FASTRES_DISPATCH_TYPES(x.scalar_type(), "batch_stats_cpu", batch_stats_kernel<scalar_t>(in, st));
  return st.merge(in.layout);
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CPU, m) {
  m.impl("bn_act", &fastres::bn_act_cpu);
  m.impl("bn_act_backward", &fastres::bn_act_backward_cpu);
  m.impl("batch_stats", &fastres::batch_stats_cpu);
}
