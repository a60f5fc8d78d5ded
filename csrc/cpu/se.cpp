// CPU kernels of fastres_native::se_gate_act and se_gate_act_backward:
//   out = act(x * s + residual),  s = sigmoid(gate) per (image, channel), gate (N, C),
// one pass over x, and its backward in one pass: dL/dz from the saved output (relu family) or z
// recomputed (silu); grad x = dL/dz * s, grad residual = dL/dz, and the gate's grad
// sum_hw(dL/dz * x) * s * (1 - s) from per-tile partial sums (fixed order: thread-count independent).
// Each image is walked as its own Layout, so its gate is one channel vector: broadcast along an
// NCHW plane, loaded along a channels_last row, exactly as bn_act's per-channel scale.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../act.h"
#include "../bn_act.h"
#include "../se.h"
#include "io.h"
#include "tiles.h"

namespace fastres {
namespace {

constexpr int64_t kTileElems = 16384;  // channels_last elements per tile, as bn_act's

struct SeInputs {
  Inputs in;     // x and residual in x's memory format; in.layout covers all images
  Tensor s;      // sigmoid(gate), (N, C) opmath, contiguous
  Layout image;  // the layout of one image
};

SeInputs se_prepare(const Tensor& x, const Tensor& gate, const OptTensor& residual) {
  SeInputs se{prepare(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, residual, kTileElems), {}, {}};
  se.s = gate_sigmoid(x, gate, se.in.opmath);
  se.image = se.in.layout;
  se.image.N = 1;
  return se;
}

// f(img, t, base, s): tile t of image img, whose elements start at flat offset base and whose
// gate vector is s (C values).
template <typename O, typename F>
void for_each_image_tile(const SeInputs& se, F&& f) {
  const Layout& L = se.image;
  const O* s = se.s.const_data_ptr<O>();
  for (int64_t img = 0; img < se.in.layout.N; ++img)
    for_each_tile(L, [&](int64_t t) { f(img, t, img * L.C * L.HW, s + img * L.C); });
}

template <typename T, Act A>
void se_gate_act_kernel(const SeInputs& se, Tensor& y) {
  using IO = Io<T>;
  using O = typename IO::O;
  const Layout& L = se.image;
  const T* x = se.in.x.const_data_ptr<T>();
  const T* r = ptr_or_null<T>(se.in.residual);
  T* out = y.mutable_data_ptr<T>();
  for_each_image_tile<O>(se, [&](int64_t, int64_t t, int64_t base, const O* s) {
    const O* sc = s + (L.cl ? 0 : t);
    for_each_step<T>(L, t, [=](int64_t i, int64_t, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      auto v = IO::load(x + base + i, n);
      auto g = IO::chan(sc, L.cl, j, n);
      typename IO::Pack rv;
      if (r) rv = IO::load(r + base + i, n);
      for (int k = 0; k < IO::kParts; ++k) {
        auto z = v[k] * g[k];
        v[k] = act_forward<A>(r ? z + rv[k] : z);
      }
      IO::store(out + base + i, v, n);
    });
  });
}

Tensor se_gate_act_cpu(const Tensor& x, const Tensor& gate, const OptTensor& residual, c10::string_view act) {
  SeInputs se = se_prepare(x, gate, residual);
  Tensor y = at::empty_like(se.in.x);
  FASTRES_DISPATCH(x.scalar_type(), parse_act(std::string(act)), "se_gate_act_cpu",
                   se_gate_act_kernel<scalar_t, kAct>(se, y));
  return y;
}

template <typename T, Act A>
void se_gate_act_backward_kernel(const SeInputs& se, const Tensor& grad, const Tensor& saved_out, Tensor& gx,
                                 const Tensor& gres, Tensor& partial) {
  using IO = Io<T>;
  using O = typename IO::O;
  const Layout& L = se.image;
  const T* dy = grad.const_data_ptr<T>();
  const T* x = se.in.x.const_data_ptr<T>();
  const T* r = ptr_or_null<T>(se.in.residual);
  const T* y = ptr_or_null<T>(saved_out);
  T* dx = gx.mutable_data_ptr<T>();
  T* dr = gres.defined() ? gres.mutable_data_ptr<T>() : nullptr;
  O* part = partial.mutable_data_ptr<O>();  // (N, tiles per image * width)
  const int64_t per_image = L.tiles() * L.width();
  for_each_image_tile<O>(se, [&](int64_t img, int64_t t, int64_t base, const O* s) {
    const O* sc = s + (L.cl ? 0 : t);
    TileSum<T> sum(part + img * per_image + t * L.width(), L.cl);
    for_each_step<T>(L, t, [=, &sum](int64_t i, int64_t, int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      auto gz = IO::load(dy + base + i, n);
      auto xv = IO::load(x + base + i, n);
      auto g = IO::chan(sc, L.cl, j, n);
      if constexpr (needs_input(A)) {
        typename IO::Pack rv;
        if (r) rv = IO::load(r + base + i, n);
        for (int k = 0; k < IO::kParts; ++k) {
          auto z = xv[k] * g[k];
          gz[k] = act_backward<A>(gz[k], r ? z + rv[k] : z);
        }
      } else if constexpr (A != Act::Identity) {
        auto yv = IO::load(y + base + i, n);
        for (int k = 0; k < IO::kParts; ++k) gz[k] = act_backward<A>(gz[k], yv[k]);
      }
      if (dr) IO::store(dr + base + i, gz, n);
      typename IO::Pack gxv, p;
      for (int k = 0; k < IO::kParts; ++k) {
        gxv[k] = gz[k] * g[k];
        p[k] = gz[k] * xv[k];
      }
      IO::store(dx + base + i, gxv, n);
      sum.add(p, j, n);
    });
    sum.finish();
  });
}

std::tuple<Tensor, Tensor, Tensor> se_gate_act_backward_cpu(const Tensor& grad_, const Tensor& x, const Tensor& gate,
                                                           const OptTensor& residual, const OptTensor& out,
                                                           c10::string_view act_name) {
  const Act act = parse_act(std::string(act_name));
  SeInputs se = se_prepare(x, gate, residual);
  Tensor grad = se.in.like_x(grad_, "grad");
  Tensor saved_out = se_saved_output(se.in, out, act);
  const Layout& L = se.image;
  Tensor gx = at::empty_like(se.in.x);
  Tensor gres = present(residual) ? at::empty_like(se.in.x) : Tensor();
  const int64_t N = se.in.layout.N;
  Tensor partial = at::zeros({N, L.tiles() * L.width()}, se.s.options());
  FASTRES_DISPATCH(x.scalar_type(), act, "se_gate_act_backward_cpu",
                   se_gate_act_backward_kernel<scalar_t, kAct>(se, grad, saved_out, gx, gres, partial));
  // per (image, channel): the tiles' partial sums, times sigmoid'(gate)
  Tensor sums = L.cl ? partial.view({N, L.tiles(), L.C}).sum(1) : partial.view({N, L.C});
  Tensor ggate = (sums * se.s * (1 - se.s)).to(gate.scalar_type());
  return {gx, ggate, gres.defined() ? gres : at::empty({0}, grad_.options())};
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CPU, m) {
  m.impl("se_gate_act", &fastres::se_gate_act_cpu);
  m.impl("se_gate_act_backward", &fastres::se_gate_act_backward_cpu);
}
