// Host-side pieces of the affine_act / batch_stats kernels shared by the CPU and CUDA files:
// argument checks, the memory layout the kernels iterate in, and the final per-channel
// reductions of per-tile partial results (done with ATen ops on small tensors).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

namespace fastres {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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
// per-channel vectors as contiguous opmath tensors (ones/zeros when absent).
struct Inputs {
  Tensor x, scale, shift, residual;
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
  if (!v.has_value() || !v->defined()) return at::full({C}, fill, x.options().dtype(opmath));
  TORCH_CHECK(v->numel() == C, "fastres: ", name, " must have one value per channel (", C, "), got ", v->numel());
  return v->reshape({C}).to(opmath).contiguous();
}

inline Inputs prepare(const Tensor& x_, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                      int64_t rows_per_tile) {
  TORCH_CHECK(x_.dim() == 4, "fastres: expects a 4-D (N, C, H, W) input, got ", x_.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()), "fastres: expects a floating input, got ", x_.scalar_type());
  Inputs in;
  in.format = x_.suggest_memory_format();
  in.x = x_.contiguous(in.format);
  in.opmath = at::toOpMathType(x_.scalar_type());
  in.scale = channel_vector(scale, in.x, in.opmath, 1.0, "scale");
  in.shift = channel_vector(shift, in.x, in.opmath, 0.0, "shift");
  if (residual.has_value() && residual->defined()) in.residual = in.like_x(*residual, "residual");
  const int64_t C = in.x.size(1);
  in.layout = Layout{in.format == at::MemoryFormat::ChannelsLast, in.x.size(0), C, in.x.size(2) * in.x.size(3),
                     std::max<int64_t>(1, rows_per_tile / std::max<int64_t>(C, 1))};
  return in;
}

// Zeroed per-tile partial sums of opmath type.
inline Tensor partial_buffer(const Inputs& in) {
  return at::zeros({in.layout.tiles() * in.layout.width()}, in.x.options().dtype(in.opmath));
}

inline Tensor channel_sum(const Tensor& partial, const Layout& L, at::ScalarType dtype) {
  return partial.view({-1, L.C}).sum(0).to(dtype);
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

// Grads of (x, residual, scale, shift) that the backward kernels fill; empty where not asked for.
struct Grads {
  Tensor gx, gres, gscale_partial, gshift_partial;
  bool need_scale, need_shift;

  Grads(const Inputs& in, const Tensor& grad, const c10::List<bool>& mask, const OptTensor& scale,
        const OptTensor& shift) {
    TORCH_CHECK(mask.size() == 4, "fastres: output_mask must have 4 entries, got ", mask.size());
    need_scale = mask[2] && scale.has_value() && scale->defined();
    need_shift = mask[3] && shift.has_value() && shift->defined();
    if (mask[0]) gx = at::empty_like(in.x);
    if (mask[1]) gres = at::empty_like(in.x);
    if (need_scale) gscale_partial = partial_buffer(in);
    if (need_shift) gshift_partial = partial_buffer(in);
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor> result(const Inputs& in, const Tensor& grad, const OptTensor& scale,
                                                    const OptTensor& shift) const {
    Tensor empty = at::empty({0}, grad.options());
    return {gx.defined() ? gx : empty, gres.defined() ? gres : empty,
            need_scale ? channel_sum(gscale_partial, in.layout, scale->scalar_type()) : empty,
            need_shift ? channel_sum(gshift_partial, in.layout, shift->scalar_type()) : empty};
  }
};

}  // namespace fastres
