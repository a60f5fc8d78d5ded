// CUDA kernels of fastres_native::bn_act, bn_act_backward and batch_stats.
//
// The forward and the backward's x-grad pass are grid-stride elementwise kernels; the channel of
// element i follows from the layout (innermost for channels_last, constant over a plane for NCHW).
// The backward's reduction pass and the statistics run one block per tile (see Layout in
// bn_act.h): an NCHW plane is reduced across the block, a channels_last tile gives each thread
// whole channels. Per-tile partial results are combined by ATen ops in bn_act.h. Math in opmath
// (fp32 for fp16/bf16).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../act.h"
#include "../bn_act.h"
#include "launch.cuh"

namespace fastres {
namespace {

constexpr int64_t kTileElems = 4096;  // channels_last elements per block

__device__ __forceinline__ int64_t channel_of(int64_t i, bool cl, int64_t C, int64_t HW) {
  return cl ? i % C : (i / HW) % C;
}

// Sum of v over the block, returned to every thread; every thread of the block must call it.
template <typename O>
__device__ O block_sum(O v) {
  __shared__ O warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  __syncthreads();  // the previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : O(0);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The tensors of one call: inputs (residual r and saved output y may be null), outputs (null
// when not asked for), per-channel vectors and partial sums in opmath.
template <typename T>
struct Args {
  using O = at::opmath_type<T>;
  const T *x, *r, *y, *dy;
  const O *scale, *shift, *mean, *k0, *k1;
  T *out, *gx, *gres;
  O *s0, *s1;
  int64_t C, HW, pixels, rows;
  bool cl;
};

template <typename T>
const T* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }
template <typename T>
T* mut_or_null(const Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; }

template <typename T>
Args<T> make_args(const Inputs& in) {
  using O = at::opmath_type<T>;
  const Layout& L = in.layout;
  Args<T> a{};
  a.x = in.x.const_data_ptr<T>();
  a.r = ptr_or_null<T>(in.residual);
  a.scale = in.scale.const_data_ptr<O>();
  a.shift = in.shift.const_data_ptr<O>();
  a.mean = in.mean.const_data_ptr<O>();
  a.C = L.C, a.HW = L.HW, a.pixels = L.pixels(), a.rows = L.rows, a.cl = L.cl;
  return a;
}

// ---- bn_act --------------------------------------------------------------------------------------
template <typename T, Act A>
__global__ void bn_act_kernel(Args<T> a, int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    const int64_t c = channel_of(i, a.cl, a.C, a.HW);
    O z = O(a.x[i]) * a.scale[c] + a.shift[c];
    if (a.r) z += O(a.r[i]);
    a.out[i] = T(act_forward<A>(z));
  }
}

Tensor bn_act_cuda(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                   const OptTensor& invstd, const OptTensor& residual, c10::string_view act) {
  c10::cuda::CUDAGuard guard(x.device());
  Inputs in = prepare(x, weight, bias, mean, invstd, residual, kTileElems);
  Tensor y = at::empty_like(in.x);
  const int64_t n = in.x.numel();
  if (n == 0) return y;
  FASTRES_DISPATCH(x.scalar_type(), parse_act(std::string(act)), "bn_act_cuda", {
    Args<scalar_t> a = make_args<scalar_t>(in);
    a.out = y.mutable_data_ptr<scalar_t>();
    bn_act_kernel<scalar_t, kAct><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---- bn_act_backward -----------------------------------------------------------------------------
// The two passes of Backward (bn_act.h).
// dL/dz at element i of channel c: silu's z recomputed from x, the relu family's mask read from
// the saved output or, without one, from that output recomputed and rounded as the forward did.
template <Act A, typename T>
__device__ __forceinline__ at::opmath_type<T> grad_z(const Args<T>& a, int64_t i, int64_t c) {
  using O = at::opmath_type<T>;
  O gz = O(a.dy[i]);
  if constexpr (A != Act::Identity) {
    if (needs_input(A) || !a.y) {
      O z = O(a.x[i]) * a.scale[c] + a.shift[c];
      if (a.r) z += O(a.r[i]);
      gz = act_backward<A>(gz, needs_input(A) ? z : O(T(act_forward<A>(z))));
    } else {
      gz = act_backward<A>(gz, O(a.y[i]));
    }
  }
  return gz;
}

// Pass 1 at element i of channel c: the elementwise grads, and the terms of the channel's sums.
template <Act A, typename T, typename O>
__device__ __forceinline__ void reduce_elem(const Args<T>& a, int64_t i, int64_t c, O& s0, O& s1) {
  const O gz = grad_z<A>(a, i, c);
  if (a.gres) a.gres[i] = T(gz);
  if (a.gx) a.gx[i] = T(gz * a.scale[c]);
  s0 += gz;
  if (a.s1) s1 += gz * (O(a.x[i]) - a.mean[c]);
}

template <typename T, Act A>
__global__ void bn_act_reduce_kernel(Args<T> a) {
  using O = at::opmath_type<T>;
  const int64_t t = blockIdx.x;
  if (!a.cl) {  // one plane, one channel: reduce over the block
    const int64_t c = t % a.C;
    O s0 = 0, s1 = 0;
    for (int64_t k = threadIdx.x; k < a.HW; k += blockDim.x) reduce_elem<A>(a, t * a.HW + k, c, s0, s1);
    if (a.s0) s0 = block_sum(s0);
    if (a.s1) s1 = block_sum(s1);
    if (threadIdx.x == 0) {
      if (a.s0) a.s0[t] = s0;
      if (a.s1) a.s1[t] = s1;
    }
    return;
  }
  const int64_t p0 = t * a.rows, p1 = min(p0 + a.rows, a.pixels);
  for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {  // whole channels per thread
    O s0 = 0, s1 = 0;
    for (int64_t p = p0; p < p1; ++p) reduce_elem<A>(a, p * a.C + c, c, s0, s1);
    if (a.s0) a.s0[t * a.C + c] = s0;
    if (a.s1) a.s1[t * a.C + c] = s1;
  }
}

template <typename T, Act A>
__global__ void bn_act_grad_x_kernel(Args<T> a, int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    const int64_t c = channel_of(i, a.cl, a.C, a.HW);
    // pass 1 stored dL/dz as the residual's grad: exactly, for a mask; read it instead of dL/dy and y
    const O gz = masks_only(A) && a.gres ? O(a.gres[i]) : grad_z<A>(a, i, c);
    a.gx[i] = T(a.scale[c] * (gz - a.k0[c] - (O(a.x[i]) - a.mean[c]) * a.k1[c]));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cuda(
    const Tensor& grad_, const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
    const OptTensor& invstd, const OptTensor& residual, const OptTensor& out, c10::string_view act_name,
    bool training, const c10::List<bool>& output_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const Act act = parse_act(std::string(act_name));
  Inputs in = prepare(x, weight, bias, mean, invstd, residual, kTileElems);
  Tensor grad = in.like_x(grad_, "grad");
  Tensor saved_out = saved_output(in, out, act == Act::Relu || act == Act::Relu6);
  Backward g(in, output_mask, weight, bias, training);
  const int64_t tiles = in.layout.tiles(), n = in.x.numel();
  FASTRES_DISPATCH(x.scalar_type(), act, "bn_act_backward_cuda", {
    using O = at::opmath_type<scalar_t>;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Args<scalar_t> a = make_args<scalar_t>(in);
    a.dy = grad.const_data_ptr<scalar_t>();
    a.y = ptr_or_null<scalar_t>(saved_out);
    a.gx = g.direct_gx() ? g.gx.mutable_data_ptr<scalar_t>() : nullptr;
    a.gres = mut_or_null<scalar_t>(g.gres);
    a.s0 = mut_or_null<O>(g.s0_partial);
    a.s1 = mut_or_null<O>(g.s1_partial);
    if (tiles > 0 && n > 0) {
      bn_act_reduce_kernel<scalar_t, kAct><<<unsigned(tiles), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    g.reduce(in);
    if (g.second_pass() && n > 0) {
      a.gx = g.gx.mutable_data_ptr<scalar_t>();
      a.k0 = g.k0.const_data_ptr<O>();
      a.k1 = g.k1.const_data_ptr<O>();
      bn_act_grad_x_kernel<scalar_t, kAct><<<grid_for(n), kThreads, 0, stream>>>(a, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return g.result(grad_, weight, bias);
}

// ---- batch_stats ---------------------------------------------------------------------------------
// Per tile: an approximate mean, then the sums of deviations from it and of their squares
// (TileStats::merge finishes the corrected two-pass formula and combines the tiles).
template <typename T>
__global__ void batch_stats_kernel(const T* x, at::opmath_type<T>* mean, at::opmath_type<T>* dev,
                                   at::opmath_type<T>* m2, int64_t C, int64_t HW, int64_t pixels, int64_t rows,
                                   bool cl) {
  using O = at::opmath_type<T>;
  const int64_t t = blockIdx.x;
  if (!cl) {
    const T* p = x + t * HW;
    O s = 0, d = 0, q = 0;
    for (int64_t k = threadIdx.x; k < HW; k += blockDim.x) s += O(p[k]);
    const O m = block_sum(s) / O(HW);
    for (int64_t k = threadIdx.x; k < HW; k += blockDim.x) {
      const O e = O(p[k]) - m;
      d += e;
      q += e * e;
    }
    d = block_sum(d);
    q = block_sum(q);
    if (threadIdx.x == 0) mean[t] = m, dev[t] = d, m2[t] = q;
    return;
  }
  const int64_t p0 = t * rows, p1 = min(p0 + rows, pixels);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    O s = 0, d = 0, q = 0;
    for (int64_t p = p0; p < p1; ++p) s += O(x[p * C + c]);
    const O m = s / O(p1 - p0);
    for (int64_t p = p0; p < p1; ++p) {
      const O e = O(x[p * C + c]) - m;
      d += e;
      q += e * e;
    }
    mean[t * C + c] = m, dev[t * C + c] = d, m2[t * C + c] = q;
  }
}

std::tuple<Tensor, Tensor> batch_stats_cuda(const Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  Inputs in = prepare(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, kTileElems);
  TileStats st(in);
  const Layout& L = in.layout;
  if (L.tiles() > 0 && in.x.numel() > 0) {
    FASTRES_DISPATCH_TYPES(x.scalar_type(), "batch_stats_cuda", {
      using O = at::opmath_type<scalar_t>;
      batch_stats_kernel<scalar_t><<<unsigned(L.tiles()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          in.x.const_data_ptr<scalar_t>(), st.mean.mutable_data_ptr<O>(), st.dev.mutable_data_ptr<O>(),
          st.m2.mutable_data_ptr<O>(), L.C, L.HW, L.pixels(), L.rows, L.cl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return st.merge(L);
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CUDA, m) {
  m.impl("bn_act", &fastres::bn_act_cuda);
  m.impl("bn_act_backward", &fastres::bn_act_backward_cuda);
  m.impl("batch_stats", &fastres::batch_stats_cuda);
}
