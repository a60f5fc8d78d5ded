// Host-side pieces of the channel-slice kernels (cpu/slices.cpp, cuda/slices.cu):
//   residual_act_(out, residual, act)  out[:, :Cr] += residual, then out = act(out), in place:
//                                      ReXNet's shortcut onto the first Cr of the output channels;
//   split_add(x, y, slot) -> x + y     and slot = y, in one pass: Res2Net's hierarchical add
//                                      x_i + y_{i-1}, writing y_{i-1} into its slot of the
//                                      concatenated output on the way.
// Every tensor may be a channel slice of a larger buffer. Each is walked as runs of contiguous
// elements: a channels_last one along each pixel's channels, an NCHW one along each image's
// channel planes. All tensors of a call share the mutated tensor's layout; an input with other
// strides is copied to it first.
#pragma once

#include <array>
#include <string>
#include <tuple>
#include <utility>

#include "act.h"
#include "bn_act.h"

namespace fastres {

// One tensor as `count` runs of `len` contiguous elements, `stride` elements apart.
struct Runs {
  int64_t count, len, stride;
};

// Whether t walks as pixel runs: unless each of its images is contiguous (NCHW, or one pixel).
inline bool pixel_runs(const Tensor& t) {
  const bool planes = (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3)) &&
                      (t.size(1) == 1 || t.stride(1) == t.size(2) * t.size(3));
  return !planes;
}

// t (N, C, H, W) as runs in the given layout, or stride -1 if its strides do not form them
// (dims of size 1 have any stride; the runs must not overlap).
inline Runs runs_of(const Tensor& t, bool pixels) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  Runs r{pixels ? N * H * W : N, pixels ? C : C * H * W, -1};
  // dims in order of increasing stride, and the stride each must have in units of the first
  // non-trivial one (pixels) or of elements (planes)
  const std::array<int64_t, 3> dims = pixels ? std::array<int64_t, 3>{3, 2, 0} : std::array<int64_t, 3>{3, 2, 1};
  int64_t unit = pixels ? -1 : 1, inner = 1;
  for (int64_t d : dims) {
    if (t.size(d) == 1) continue;
    if (unit < 0) unit = t.stride(d);
    if (t.stride(d) != unit * inner) return r;
    inner *= t.size(d);
  }
  if (pixels) {
    if (C > 1 && t.stride(1) != 1) return r;
    r.stride = unit < 0 ? r.len : unit;
  } else {
    r.stride = N > 1 ? t.stride(0) : r.len;
  }
  if (r.count > 1 && r.stride < r.len) r.stride = -1;
  return r;
}

// An input's runs in the layout of the call: t itself if its strides allow, else a copy.
inline std::pair<Tensor, Runs> input_runs(const Tensor& t, bool pixels) {
  Runs r = runs_of(t, pixels);
  if (r.stride >= 0) return {t, r};
  Tensor c = t.contiguous(pixels ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return {c, runs_of(c, pixels)};
}

// The mutated tensor's runs; it cannot be copied, so other strides are an error.
inline Runs output_runs(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastres: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastres: ", name, " must be floating, got ", t.scalar_type());
  Runs r = runs_of(t, pixel_runs(t));
  TORCH_CHECK(r.stride >= 0, "fastres: ", name, " must be a channel slice of an NCHW or channels_last tensor, got "
              "strides ", t.strides());
  return r;
}

inline void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name, bool channels) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == ref.size(0) && t.size(2) == ref.size(2) && t.size(3) == ref.size(3) &&
                  (channels ? t.size(1) == ref.size(1) : t.size(1) <= ref.size(1)),
              "fastres: ", name, " must be (N, ", channels ? "C" : "C' <= C", ", H, W) with ", ref_name, "'s ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastres: ", name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastres: ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

// The arguments of residual_act_: out's runs, and the residual (in out's layout) with its runs.
struct ResidualCall {
  Runs out, res;
  Tensor residual;
  Act act;
};

inline ResidualCall residual_call(const Tensor& out, const Tensor& residual, c10::string_view act) {
  ResidualCall c;
  c.out = output_runs(out, "out");
  check_like(residual, out, "residual", "out", false);
  std::tie(c.residual, c.res) = input_runs(residual, pixel_runs(out));
  c.act = parse_act(std::string(act));
  return c;
}

// The arguments of split_add: slot's runs, x and y in its layout, and the sum (allocated in it).
struct SplitCall {
  Runs slot, x, y, sum;
  Tensor xs, ys, out;
};

inline SplitCall split_call(const Tensor& x, const Tensor& y, const Tensor& slot) {
  SplitCall c;
  c.slot = output_runs(slot, "slot");
  check_like(x, slot, "x", "slot", true);
  check_like(y, slot, "y", "slot", true);
  const bool pixels = pixel_runs(slot);
  std::tie(c.xs, c.x) = input_runs(x, pixels);
  std::tie(c.ys, c.y) = input_runs(y, pixels);
  c.out = at::empty(slot.sizes(), slot.options().memory_format(pixels ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous));
  c.sum = runs_of(c.out, pixels);
  return c;
}

}  // namespace fastres
