// CUDA kernels of fastres_native::affine_act, affine_act_backward and batch_stats.
//
// The forward is a grid-stride elementwise kernel; the channel of element i follows from the
// layout (innermost for channels_last, constant over a plane for NCHW). The backward and the
// statistics run one block per tile (see Layout in bn_act.h): an NCHW plane is reduced across
// the block, a channels_last tile gives each thread whole channels. Per-tile partial results
// are combined by ATen ops in bn_act.h. Math in opmath (fp32 for fp16/bf16).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../act.h"
#include "../bn_act.h"

namespace fastres {
namespace {

constexpr int kThreads = 256;
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
  const O *scale, *shift;
  T *out, *gx, *gres;
  O *dscale, *dshift;
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
  a.C = L.C, a.HW = L.HW, a.pixels = L.pixels(), a.rows = L.rows, a.cl = L.cl;
  return a;
}

// Grid-stride loops: enough blocks to fill any current GPU, the loop covers the rest.
int grid_for(int64_t n) { return int(std::min<int64_t>((n + kThreads - 1) / kThreads, 8192)); }

// ---- affine_act ----------------------------------------------------------------------------------
template <typename T, Act A>
__global__ void affine_act_kernel(Args<T> a, int64_t n) {
  using O = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = channel_of(i, a.cl, a.C, a.HW);
    O z = O(a.x[i]) * a.scale[c] + a.shift[c];
    if (a.r) z += O(a.r[i]);
    a.out[i] = T(act_forward<A>(z));
  }
}

Tensor affine_act_cuda(const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                       c10::string_view act) {
  c10::cuda::CUDAGuard guard(x.device());
  Inputs in = prepare(x, scale, shift, residual, kTileElems);
  Tensor y = at::empty_like(in.x);
  const int64_t n = in.x.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_act_cuda", [&] {
    Args<scalar_t> a = make_args<scalar_t>(in);
    a.out = y.mutable_data_ptr<scalar_t>();
    dispatch_act(parse_act(std::string(act)), [&](auto act_c) {
      affine_act_kernel<scalar_t, decltype(act_c)::value>
          <<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

// ---- affine_act_backward -------------------------------------------------------------------------
// dL/dz at element i: writes the x and residual grads, adds to the per-channel sums.
template <Act A, typename T, typename O>
__device__ __forceinline__ void backward_elem(const Args<T>& a, int64_t i, O s, O b, O& sum_gx, O& sum_g) {
  O gz = O(a.dy[i]);
  if constexpr (needs_input(A)) {
    O z = O(a.x[i]) * s + b;
    if (a.r) z += O(a.r[i]);
    gz = act_backward<A>(gz, z);
  } else if constexpr (A != Act::Identity) {
    gz = act_backward<A>(gz, O(a.y[i]));
  }
  if (a.gx) a.gx[i] = T(gz * s);
  if (a.gres) a.gres[i] = T(gz);
  if (a.dscale) sum_gx += gz * O(a.x[i]);
  sum_g += gz;
}

template <typename T, Act A>
__global__ void affine_act_backward_kernel(Args<T> a) {
  using O = at::opmath_type<T>;
  const int64_t t = blockIdx.x;
  if (!a.cl) {  // one plane, one channel: reduce over the block
    const int64_t c = t % a.C;
    O sum_gx = 0, sum_g = 0;
    for (int64_t k = threadIdx.x; k < a.HW; k += blockDim.x)
      backward_elem<A>(a, t * a.HW + k, a.scale[c], a.shift[c], sum_gx, sum_g);
    if (a.dscale) sum_gx = block_sum(sum_gx);
    if (a.dshift) sum_g = block_sum(sum_g);
    if (threadIdx.x == 0) {
      if (a.dscale) a.dscale[t] = sum_gx;
      if (a.dshift) a.dshift[t] = sum_g;
    }
    return;
  }
  const int64_t p0 = t * a.rows, p1 = min(p0 + a.rows, a.pixels);
  for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {  // whole channels per thread
    O sum_gx = 0, sum_g = 0;
    for (int64_t p = p0; p < p1; ++p) backward_elem<A>(a, p * a.C + c, a.scale[c], a.shift[c], sum_gx, sum_g);
    if (a.dscale) a.dscale[t * a.C + c] = sum_gx;
    if (a.dshift) a.dshift[t * a.C + c] = sum_g;
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> affine_act_backward_cuda(
    const Tensor& grad_, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
    const OptTensor& out, c10::string_view act_name, const c10::List<bool>& output_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const Act act = parse_act(std::string(act_name));
  Inputs in = prepare(x, scale, shift, residual, kTileElems);
  Tensor grad = in.like_x(grad_, "grad");
  Tensor saved_out;
  if (act == Act::Relu || act == Act::Relu6) {
    TORCH_CHECK(out.has_value() && out->defined(), "fastres: affine_act_backward needs the saved output for ",
                act_name);
    saved_out = in.like_x(*out, "out");
  }
  Grads g(in, grad, output_mask, scale, shift);
  const int64_t tiles = in.layout.tiles();
  if (tiles > 0 && in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_act_backward_cuda", [&] {
      using O = at::opmath_type<scalar_t>;
      Args<scalar_t> a = make_args<scalar_t>(in);
      a.dy = grad.const_data_ptr<scalar_t>();
      a.y = ptr_or_null<scalar_t>(saved_out);
      a.gx = mut_or_null<scalar_t>(g.gx);
      a.gres = mut_or_null<scalar_t>(g.gres);
      a.dscale = mut_or_null<O>(g.gscale_partial);
      a.dshift = mut_or_null<O>(g.gshift_partial);
      dispatch_act(act, [&](auto act_c) {
        affine_act_backward_kernel<scalar_t, decltype(act_c)::value>
            <<<unsigned(tiles), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return g.result(in, grad_, scale, shift);
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
  Inputs in = prepare(x, std::nullopt, std::nullopt, std::nullopt, kTileElems);
  TileStats st(in);
  const Layout& L = in.layout;
  if (L.tiles() > 0 && in.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stats_cuda", [&] {
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
  m.impl("affine_act", &fastres::affine_act_cuda);
  m.impl("affine_act_backward", &fastres::affine_act_backward_cuda);
  m.impl("batch_stats", &fastres::batch_stats_cuda);
}
