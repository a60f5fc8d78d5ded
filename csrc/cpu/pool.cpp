// CPU kernel of fastres_native::bn_act_pool2d: out = pool(act(x * scale + shift)), max or average
// (the average counting padded pixels as zeros, floor mode), in one pass over x.
//
// The activated tensor is never written, and max pooling keeps no argmax (the op's backward
// recomputes both), so an inference stem's maxpool reads its input once and writes its output.
// Channels_last runs a channel vector per output pixel (Io steps along the channel row); NCHW runs
// one (n, c) plane at a time with the channel's scale/shift as scalars.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../act.h"
#include "../bn_act.h"
#include "io.h"

namespace fastres {
namespace {

struct Window {
  int64_t kh, kw, sh, sw, ph, pw, H, W, OH, OW;

  // The input rows [begin, end) under output row o (likewise for columns): padding excluded.
  static std::pair<int64_t, int64_t> span(int64_t o, int64_t k, int64_t s, int64_t p, int64_t n) {
    const int64_t start = o * s - p;
    return {std::max<int64_t>(start, 0), std::min(start + k, n)};
  }
};

template <typename O, bool kMax>
C10_ALWAYS_INLINE O combine(O acc, O z) {
  if constexpr (kMax) {
    return vmax(z, acc);  // NaN-propagating, as ATen's max pooling
  } else {
    return acc + z;
  }
}

template <typename T, Act A, bool kMax>
void pool_channels_last(const Inputs& in, const Window& g, Tensor& y) {
  using IO = Io<T>;
  using O = typename IO::O;
  using V = typename IO::V;
  const int64_t C = in.layout.C;
  const T* x = in.x.const_data_ptr<T>();
  const O* scale = in.scale.const_data_ptr<O>();
  const O* shift = in.shift.const_data_ptr<O>();
  T* out = y.mutable_data_ptr<T>();
  const V init(kMax ? -std::numeric_limits<O>::infinity() : O(0));
  const V inv_area(O(1) / O(g.kh * g.kw));
  const int64_t rows = in.x.size(0) * g.OH;
  at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(g.OW * C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH;
      const auto [h0, h1] = Window::span(oh, g.kh, g.sh, g.ph, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const auto [w0, w1] = Window::span(ow, g.kw, g.sw, g.pw, g.W);
        T* o = out + (row * g.OW + ow) * C;
        for (int64_t j = 0; j < C; j += IO::kStep) {
          const int64_t len = std::min(IO::kStep, C - j);
          auto s = IO::chan(scale, true, j, len), b = IO::chan(shift, true, j, len);
          typename IO::Pack acc;
          acc.fill(init);
          for (int64_t h = h0; h < h1; ++h) {
            for (int64_t w = w0; w < w1; ++w) {
              auto v = IO::load(x + ((n * g.H + h) * g.W + w) * C + j, len);
              for (int k = 0; k < IO::kParts; ++k) acc[k] = combine<V, kMax>(acc[k], act_forward<A>(v[k] * s[k] + b[k]));
            }
          }
          if constexpr (!kMax) {
            for (int k = 0; k < IO::kParts; ++k) acc[k] = acc[k] * inv_area;
          }
          IO::store(o + j, acc, len);
        }
      }
    }
  });
}

template <typename T, Act A, bool kMax>
void pool_planes(const Inputs& in, const Window& g, Tensor& y) {
  using O = at::opmath_type<T>;
  const int64_t C = in.layout.C;
  const T* x = in.x.const_data_ptr<T>();
  const O* scale = in.scale.const_data_ptr<O>();
  const O* shift = in.shift.const_data_ptr<O>();
  T* out = y.mutable_data_ptr<T>();
  const O init = kMax ? -std::numeric_limits<O>::infinity() : O(0);
  at::parallel_for(0, in.x.size(0) * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const O s = scale[plane % C], b = shift[plane % C];
      const T* xp = x + plane * g.H * g.W;
      T* op = out + plane * g.OH * g.OW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const auto [h0, h1] = Window::span(oh, g.kh, g.sh, g.ph, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const auto [w0, w1] = Window::span(ow, g.kw, g.sw, g.pw, g.W);
          O acc = init;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) acc = combine<O, kMax>(acc, act_forward<A>(O(xp[h * g.W + w]) * s + b));
          op[oh * g.OW + ow] = T(kMax ? acc : acc / O(g.kh * g.kw));
        }
      }
    }
  });
}

int64_t out_size(int64_t n, int64_t k, int64_t s, int64_t p) { return (n + 2 * p - k) / s + 1; }

Tensor bn_act_pool2d_cpu(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                         const OptTensor& invstd, c10::string_view act, c10::string_view kind,
                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "fastres: bn_act_pool2d takes 2-D kernel_size, stride and padding");
  TORCH_CHECK(kind == "max" || kind == "avg", "fastres: bn_act_pool2d kind must be 'max' or 'avg', got '",
              std::string(kind), "'");
  Inputs in = prepare(x, weight, bias, mean, invstd, std::nullopt, 1);
  Window g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], in.x.size(2), in.x.size(3), 0, 0};
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && 2 * g.ph <= g.kh && 2 * g.pw <= g.kw && g.ph >= 0 &&
                  g.pw >= 0,
              "fastres: bn_act_pool2d needs a positive kernel and stride and 0 <= padding <= kernel / 2, got kernel ",
              kernel_size, ", stride ", stride, ", padding ", padding);
  g.OH = out_size(g.H, g.kh, g.sh, g.ph);
  g.OW = out_size(g.W, g.kw, g.sw, g.pw);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "fastres: bn_act_pool2d output would be empty for input ", x.sizes());
  Tensor y = at::empty({in.x.size(0), in.x.size(1), g.OH, g.OW}, in.x.options().memory_format(in.format));
  const bool is_max = kind == "max";
  FASTRES_DISPATCH(x.scalar_type(), parse_act(std::string(act)), "bn_act_pool2d_cpu", {
    if (in.layout.cl) {
      is_max ? pool_channels_last<scalar_t, kAct, true>(in, g, y) : pool_channels_last<scalar_t, kAct, false>(in, g, y);
    } else {
      is_max ? pool_planes<scalar_t, kAct, true>(in, g, y) : pool_planes<scalar_t, kAct, false>(in, g, y);
    }
  });
  return y;
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CPU, m) { m.impl("bn_act_pool2d", &fastres::bn_act_pool2d_cpu); }
