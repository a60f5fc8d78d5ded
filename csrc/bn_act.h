// Host-side pieces of the bn_act / bn_act_backward / batch_stats kernels shared by the CPU and CUDA
// files: argument checks, the per-channel scale/shift, the memory layout the kernels iterate in,
// and the per-channel reductions of per-tile partial results.
//
// That per-channel math is a few hundred scalars. On the GPU it runs as ATen ops on the channel
// vectors where they live; for a CPU tensor it runs as host loops (with_host_vectors), since
// each ATen op would cost an allocation and a dispatch, several microseconds, which at small
// activations outweighs the kernel itself. Both evaluate the same formulas (the templates below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastres {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---- per-channel formulas: V is a scalar (host loop) or a channel vector (ATen ops) -------------
template <class V> V bn_scale(const V& invstd, const V& weight) { return invstd * weight; }
template <class V> V bn_shift(const V& bias, const V& mean, const V& scale) { return bias - mean * scale; }
// a tile's exact mean and sum of squared deviations from its approximate mean, the sum of the
// deviations from it and the sum of their squares (the corrected two-pass formula)
template <class V, class N> V exact_mean(const V& approx, const V& dev, const N& n) { return approx + dev / n; }
template <class V, class N> V exact_m2(const V& sq, const V& dev, const N& n) { return sq - dev * dev / n; }

// f(p) on the host for contiguous CPU vectors of one opmath type: p[i] points to the data of
// vectors[i] (nullptr for an undefined one); Elem<decltype(p)> is that type.
template <size_t K, typename F>
void with_host_vectors(at::ScalarType opmath, const std::array<Tensor, K>& vectors, F&& f) {
  AT_DISPATCH_FLOATING_TYPES(opmath, "fastres_channels", [&] {
    std::array<scalar_t*, K> p;
    for (size_t i = 0; i < K; ++i) p[i] = vectors[i].defined() ? vectors[i].template mutable_data_ptr<scalar_t>() : nullptr;
    f(p);
  });
}
template <class P> using Elem = std::remove_pointer_t<typename P::value_type>;

// A contiguous 4-D tensor cut into tiles that the kernels process independently: an NCHW tile is
// one (n, c) plane of HW elements (one channel); a channels_last tile is `rows` pixels of C
// channels each (channel innermost). Per-tile partial sums are stored as a [tiles * width] buffer
// whose view(-1, C) sums over dim 0 to per-channel totals. In channels_last the input x may be a
// channel slice of a wider buffer (DenseNet's prefix of its features): its pixels are then `xs`
// elements apart instead of C (CPU kernels of inputs prepared with `sliced_x`).
struct Layout {
  bool cl;
  int64_t N, C, HW, rows;
  int64_t xs = C;

  int64_t pixels() const { return N * HW; }
  int64_t tiles() const { return cl ? (pixels() + rows - 1) / rows : N * C; }
  int64_t tile_elems() const { return cl ? rows * C : HW; }
  int64_t width() const { return cl ? C : 1; }
  // Rows of the view(-1, C) of a partial-sum buffer (none without channels).
  int64_t partial_rows() const { return C > 0 ? tiles() * width() / C : 0; }
  int64_t count(int64_t t) const { return cl ? std::min(rows, pixels() - t * rows) : HW; }
  // Elements per partial row of the view(-1, C), shaped [-1, 1] to broadcast against it.
  Tensor counts(const at::TensorOptions& opts) const {
    if (!cl) return at::full({N, 1}, double(HW), opts);
    return (pixels() - at::arange(tiles(), opts) * double(rows)).clamp_max(double(rows)).view({-1, 1});
  }
};

// The inputs of one call, in one memory format (x's own when it is a contiguous one, or with
// `sliced_x` a channel slice of a channels_last one; a copy is made only for other strides, or for
// a residual/grad/out in a different format), with the per-channel vectors as contiguous opmath
// tensors:
//   z = x * scale + shift (+ residual),  scale = invstd * weight,  shift = bias - mean * scale,
// mean 0, invstd 1, weight 1, bias 0 where absent (which reproduces the reference's values exactly).
struct Inputs {
  Tensor x, residual, scale, shift, mean, invstd;
  Layout layout;
  at::MemoryFormat format;
  at::ScalarType opmath;

  Tensor like_x(const Tensor& t, const char* name) const {
    TORCH_CHECK(t.sizes() == x.sizes(), "fastres: ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres: ", name, " must have x's dtype ", x.scalar_type(),
                ", got ", t.scalar_type());
    return t.contiguous(format);
  }
};

inline Tensor channel_vector(const OptTensor& v, const Tensor& x, at::ScalarType opmath, double fill, const char* name) {
  const int64_t C = x.size(1);
  if (!present(v)) return at::full({C}, fill, x.options().dtype(opmath));
  TORCH_CHECK(v->numel() == C, "fastres: ", name, " must have one value per channel (", C, "), got ", v->numel());
  TORCH_CHECK(v->device() == x.device(), "fastres: ", name, " must be on x's device ", x.device());
  return v->reshape({C}).to(opmath).contiguous();
}

// x's pixel stride if it is a channel slice of a channels_last tensor: channels contiguous and
// pixels evenly `stride(3)` apart in (n, h, w) order; 0 otherwise.
inline int64_t channel_slice_stride(const Tensor& x) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), xs = x.stride(3);
  const bool ok = (C == 1 || x.stride(1) == 1) && xs >= C && (H == 1 || x.stride(2) == W * xs) &&
                  (x.size(0) == 1 || x.stride(0) == H * W * xs);
  return ok ? xs : 0;
}

inline Inputs prepare(const Tensor& x_, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                      const OptTensor& invstd, const OptTensor& residual, int64_t rows_per_tile,
                      bool sliced_x = false) {
  TORCH_CHECK(x_.dim() == 4, "fastres: expects a 4-D (N, C, H, W) input, got ", x_.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()), "fastres: expects a floating input, got ", x_.scalar_type());
  Inputs in;
  in.format = x_.suggest_memory_format();
  const int64_t xs = sliced_x && in.format == at::MemoryFormat::ChannelsLast ? channel_slice_stride(x_) : 0;
  in.x = xs > 0 ? x_ : x_.contiguous(in.format);
  in.opmath = at::toOpMathType(x_.scalar_type());
  in.mean = channel_vector(mean, in.x, in.opmath, 0.0, "mean");
  in.invstd = channel_vector(invstd, in.x, in.opmath, 1.0, "invstd");
  Tensor w = channel_vector(weight, in.x, in.opmath, 1.0, "weight");
  Tensor b = channel_vector(bias, in.x, in.opmath, 0.0, "bias");
  if (in.x.is_cpu()) {
    in.scale = at::empty_like(w);
    in.shift = at::empty_like(b);
    with_host_vectors<6>(in.opmath, {in.mean, in.invstd, w, b, in.scale, in.shift}, [&](auto p) {
      for (int64_t c = 0; c < w.numel(); ++c) {
        p[4][c] = bn_scale(p[1][c], p[2][c]);
        p[5][c] = bn_shift(p[3][c], p[0][c], p[4][c]);
      }
    });
  } else {
    in.scale = bn_scale(in.invstd, w);
    in.shift = bn_shift(b, in.mean, in.scale);
  }
  if (present(residual)) in.residual = in.like_x(*residual, "residual");
  const int64_t C = in.x.size(1);
  in.layout = Layout{in.format == at::MemoryFormat::ChannelsLast, in.x.size(0), C, in.x.size(2) * in.x.size(3),
                     std::max<int64_t>(1, rows_per_tile / std::max<int64_t>(C, 1))};
  if (xs > 0) in.layout.xs = xs;
  return in;
}

// Zeroed per-tile partial sums of opmath type.
inline Tensor partial_buffer(const Inputs& in) {
  return at::zeros({in.layout.tiles() * in.layout.width()}, in.x.options().dtype(in.opmath));
}

// Per-channel totals of a partial-sum buffer, times `factor` when given (a channel vector).
inline Tensor channel_sum(const Tensor& partial, const Layout& L, const Tensor& factor = {}) {
  if (!partial.is_cpu()) {
    Tensor total = partial.view({-1, L.C}).sum(0);
    return factor.defined() ? total * factor : total;
  }
  Tensor total = at::empty({L.C}, partial.options());
  with_host_vectors<3>(partial.scalar_type(), {partial, total, factor}, [&](auto p) {
    const int64_t rows = L.partial_rows();
    for (int64_t c = 0; c < L.C; ++c) {
      Elem<decltype(p)> acc = 0;
      for (int64_t t = 0; t < rows; ++t) acc += p[0][t * L.C + c];
      p[1][c] = p[2] ? acc * p[2][c] : acc;
    }
  });
  return total;
}

// Per-tile statistics from the batch_stats kernels: an approximate tile mean, the sum of the
// deviations from it and the sum of their squares.
struct TileStats {
  Tensor mean, dev, m2;

  explicit TileStats(const Inputs& in) : mean(partial_buffer(in)), dev(partial_buffer(in)), m2(partial_buffer(in)) {}

  // Per-channel (mean, biased variance): each tile's exact mean and sum of squared deviations
  // (the corrected two-pass formula), combined by the law of total variance; there is no
  // E[x^2] - E[x]^2 cancellation anywhere.
  std::tuple<Tensor, Tensor> merge(const Layout& L) const {
    const double n = double(L.pixels());
    if (!mean.is_cpu()) {
      Tensor counts = L.counts(mean.options());
      Tensor dev_t = dev.view({-1, L.C});
      Tensor mean_t = exact_mean(mean.view({-1, L.C}), dev_t, counts);
      Tensor m2_t = exact_m2(m2.view({-1, L.C}), dev_t, counts);
      Tensor total_mean = (counts * mean_t).sum(0) / n;
      Tensor total_m2 = m2_t.sum(0) + (counts * (mean_t - total_mean).square()).sum(0);
      return {total_mean, total_m2 / n};
    }
    Tensor total_mean = at::empty({L.C}, mean.options()), total_var = at::empty({L.C}, mean.options());
    const int64_t rows = L.partial_rows();
    with_host_vectors<5>(mean.scalar_type(), {mean, dev, m2, total_mean, total_var}, [&](auto p) {
      using O = Elem<decltype(p)>;
      auto count = [&](int64_t t) { return O(L.count(t)); };
      for (int64_t c = 0; c < L.C; ++c) {
        O sum = 0, m2_sum = 0, between = 0;
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t i = t * L.C + c;
          sum += count(t) * exact_mean(p[0][i], p[1][i], count(t));
          m2_sum += exact_m2(p[2][i], p[1][i], count(t));
        }
        const O mu = sum / O(n);
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t i = t * L.C + c;
          const O d = exact_mean(p[0][i], p[1][i], count(t)) - mu;
          between += count(t) * d * d;
        }
        p[3][c] = mu;
        p[4][c] = (m2_sum + between) / O(n);
      }
    });
    return {total_mean, total_var};
  }
};

// The backward in two passes over the data. With gz = dL/dz and xhat = (x - mean) * invstd:
//   pass 1 (reduction): per-tile partial sums of S0 = Σ gz and of Σ gz * (x - mean) (times invstd
//     once summed: S1 = Σ gz * xhat), and the elementwise grads: residual (gz) and, without
//     `training`, x (gz * scale);
//   pass 2 (only for the x grad with `training`): gx = scale * (gz - k0 - (x - mean) * k1) with
//     k0 = S0 / n, k1 = S1 * invstd / n, n = N*H*W, gz recomputed.
// grad weight = S1, grad bias = S0. Outputs not asked for are left undefined (empty in result()).
struct Backward {
  Tensor gx, gres, s0_partial, s1_partial, s0, s1, k0, k1;
  bool training, need_w, need_b;

  Backward(const Inputs& in, const c10::List<bool>& mask, const OptTensor& weight, const OptTensor& bias,
           bool training_)
      : training(training_) {
    TORCH_CHECK(mask.size() == 4, "fastres: output_mask must have 4 entries, got ", mask.size());
    need_w = mask[2] && present(weight);
    need_b = mask[3] && present(bias);
    if (mask[0]) gx = at::empty_like(in.x);
    if (mask[1]) gres = at::empty_like(in.x);
    if (need_b || second_pass()) s0_partial = partial_buffer(in);
    if (need_w || second_pass()) s1_partial = partial_buffer(in);
  }

  bool second_pass() const { return gx.defined() && training; }
  bool direct_gx() const { return gx.defined() && !training; }

  // Between the passes: per-channel totals, and the coefficients of pass 2.
  void reduce(const Inputs& in) {
    if (s0_partial.defined()) s0 = channel_sum(s0_partial, in.layout);
    // an empty sum stays 0, as the reference's, whatever invstd is
    if (s1_partial.defined()) s1 = channel_sum(s1_partial, in.layout, in.layout.pixels() > 0 ? in.invstd : Tensor());
    if (!second_pass()) return;
    const double n = double(std::max<int64_t>(in.layout.pixels(), 1));
    if (!s0.is_cpu()) {
      k0 = (s0 / n).contiguous();
      k1 = (s1 * in.invstd / n).contiguous();
      return;
    }
    k0 = at::empty_like(s0);
    k1 = at::empty_like(s1);
    with_host_vectors<5>(in.opmath, {s0, s1, in.invstd, k0, k1}, [&](auto p) {
      using O = Elem<decltype(p)>;
      for (int64_t c = 0; c < in.layout.C; ++c) {
        p[3][c] = p[0][c] / O(n);
        p[4][c] = p[1][c] * p[2][c] / O(n);
      }
    });
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor> result(const Tensor& grad, const OptTensor& weight,
                                                    const OptTensor& bias) const {
    auto empty = [&] { return at::empty({0}, grad.options()); };
    return {gx.defined() ? gx : empty(), gres.defined() ? gres : empty(),
            need_w ? s1.to(weight->scalar_type()) : empty(), need_b ? s0.to(bias->scalar_type()) : empty()};
  }
};

// The checked saved output `out` that the relu family reads its mask from (undefined otherwise).
// The saved output the relu family reads its mask from; undefined without one (then the mask is
// recomputed from x) and for the other activations.
inline Tensor saved_output(const Inputs& in, const OptTensor& out, bool used) {
  if (!used || !present(out)) return {};
  return in.like_x(*out, "out");
}

}  // namespace fastres
