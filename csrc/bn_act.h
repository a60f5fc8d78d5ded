// Host-side pieces of the bn_act / bn_act_backward / batch_stats kernels shared by the CPU and CUDA
// files: argument checks, the per-channel scale/shift, the memory layout the kernels iterate in,
// and the per-channel reductions of per-tile partial results (ATen ops on small tensors).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

namespace fastres {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// A contiguous 4-D tensor cut into tiles that the kernels process independently: an NCHW tile is
// one (n, c) plane of HW elements (one channel); a channels_last tile is `rows` pixels of C
// channels each (channel innermost). Per-tile partial sums are stored as a [tiles * width] buffer
// whose view(-1, C) sums over dim 0 to per-channel totals.
struct Layout {
  bool cl;
  int64_t N, C, HW, rows;

  int64_t pixels() const { return N * HW; }
  int64_t tiles() const { return cl ? (pixels() + rows - 1) / rows : N * C; }
  int64_t tile_elems() const { return cl ? rows * C : HW; }
  int64_t width() const { return cl ? C : 1; }
  int64_t count(int64_t t) const { return cl ? std::min(rows, pixels() - t * rows) : HW; }
  // Elements per partial row of the view(-1, C), shaped [-1, 1] to broadcast against it.
  Tensor counts(const at::TensorOptions& opts) const {
    if (!cl) return at::full({N, 1}, double(HW), opts);
    return (pixels() - at::arange(tiles(), opts) * double(rows)).clamp_max(double(rows)).view({-1, 1});
  }
};

// The inputs of one call, in one memory format (x's own when it is a contiguous one; a copy is
// made only for other strides, or for a residual/grad/out in a different format), with the
// per-channel vectors as contiguous opmath tensors:
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

inline Inputs prepare(const Tensor& x_, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                      const OptTensor& invstd, const OptTensor& residual, int64_t rows_per_tile) {
  TORCH_CHECK(x_.dim() == 4, "fastres: expects a 4-D (N, C, H, W) input, got ", x_.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()), "fastres: expects a floating input, got ", x_.scalar_type());
  Inputs in;
  in.format = x_.suggest_memory_format();
  in.x = x_.contiguous(in.format);
  in.opmath = at::toOpMathType(x_.scalar_type());
  in.mean = channel_vector(mean, in.x, in.opmath, 0.0, "mean");
  in.invstd = channel_vector(invstd, in.x, in.opmath, 1.0, "invstd");
  in.scale = in.invstd * channel_vector(weight, in.x, in.opmath, 1.0, "weight");
  in.shift = channel_vector(bias, in.x, in.opmath, 0.0, "bias") - in.mean * in.scale;
  if (present(residual)) in.residual = in.like_x(*residual, "residual");
  const int64_t C = in.x.size(1);
  in.layout = Layout{in.format == at::MemoryFormat::ChannelsLast, in.x.size(0), C, in.x.size(2) * in.x.size(3),
                     std::max<int64_t>(1, rows_per_tile / std::max<int64_t>(C, 1))};
  return in;
}

// Zeroed per-tile partial sums of opmath type.
inline Tensor partial_buffer(const Inputs& in) {
  return at::zeros({in.layout.tiles() * in.layout.width()}, in.x.options().dtype(in.opmath));
}

inline Tensor channel_sum(const Tensor& partial, const Layout& L) { return partial.view({-1, L.C}).sum(0); }

// Per-tile statistics from the batch_stats kernels: an approximate tile mean, the sum of the
// deviations from it and the sum of their squares.
struct TileStats {
  Tensor mean, dev, m2;

  explicit TileStats(const Inputs& in) : mean(partial_buffer(in)), dev(partial_buffer(in)), m2(partial_buffer(in)) {}

  // Per-channel (mean, biased variance): each tile's exact mean and sum of squared deviations
  // (the corrected two-pass formula), combined by the law of total variance; there is no
  // E[x^2] - E[x]^2 cancellation anywhere.
  std::tuple<Tensor, Tensor> merge(const Layout& L) const {
    Tensor counts = L.counts(mean.options());
    Tensor dev_t = dev.view({-1, L.C});
    Tensor mean_t = mean.view({-1, L.C}) + dev_t / counts;
    Tensor m2_t = m2.view({-1, L.C}) - dev_t.square() / counts;
    const double n = double(L.pixels());
    Tensor total_mean = (counts * mean_t).sum(0) / n;
    Tensor total_m2 = m2_t.sum(0) + (counts * (mean_t - total_mean).square()).sum(0);
    return {total_mean, total_m2 / n};
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
    if (s1_partial.defined()) {  // an empty sum stays 0, as the reference's, whatever invstd is
      s1 = channel_sum(s1_partial, in.layout);
      if (in.layout.pixels() > 0) s1 = s1 * in.invstd;
    }
    if (!second_pass()) return;
    const double n = double(std::max<int64_t>(in.layout.pixels(), 1));
    k0 = (s0 / n).contiguous();
    k1 = (s1 * in.invstd / n).contiguous();
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
