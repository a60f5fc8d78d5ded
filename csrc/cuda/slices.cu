// CUDA kernels of fastres_native::residual_act_ and split_add (see slices.h): grid-stride loops
// over the elements of the runs, math in opmath (fp32 for fp16/bf16), on the current stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../act.h"
#include "../slices.h"
#include "launch.cuh"

namespace fastres {
namespace {

// Element j of run r of out gets residual element j of run r when j < res.len; with an
// activation every element of out is visited, without one only the residual's.
template <typename T, Act A>
__global__ void residual_act_kernel(T* out, const T* res, Runs o, Runs r, int64_t len, int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    const int64_t run = i / len, j = i % len;
    T* p = out + run * o.stride + j;
    O v = O(*p);
    if (j < r.len) v += O(res[run * r.stride + j]);
    *p = T(act_forward<A>(v));
  }
}

template <typename T>
__global__ void split_add_kernel(const T* x, const T* y, T* slot, T* sum, Runs rx, Runs ry, Runs rs, Runs ro,
                                 int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    const int64_t run = i / rs.len, j = i % rs.len;
    const T yv = y[run * ry.stride + j];
    slot[run * rs.stride + j] = yv;
    sum[run * ro.stride + j] = T(O(x[run * rx.stride + j]) + O(yv));
  }
}

void residual_act_cuda(const Tensor& out, const Tensor& residual, c10::string_view act) {
  c10::cuda::CUDAGuard guard(out.device());
  ResidualCall c = residual_call(out, residual, act);
  const int64_t len = c.act == Act::Identity ? c.res.len : c.out.len;
  const int64_t n = c.out.count * len;
  if (n == 0) return;
  FASTRES_DISPATCH(out.scalar_type(), c.act, "residual_act_cuda", {
    residual_act_kernel<scalar_t, kAct><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), c.residual.const_data_ptr<scalar_t>(), c.out, c.res, len, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor split_add_cuda(const Tensor& x, const Tensor& y, const Tensor& slot) {
  c10::cuda::CUDAGuard guard(slot.device());
  SplitCall c = split_call(x, y, slot);
  const int64_t n = c.slot.count * c.slot.len;
  if (n == 0) return c.out;
  FASTRES_DISPATCH_TYPES(slot.scalar_type(), "split_add_cuda", {
    split_add_kernel<scalar_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        c.xs.const_data_ptr<scalar_t>(), c.ys.const_data_ptr<scalar_t>(), slot.mutable_data_ptr<scalar_t>(),
        c.out.mutable_data_ptr<scalar_t>(), c.x, c.y, c.slot, c.sum, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CUDA, m) {
  m.impl("residual_act_", &fastres::residual_act_cuda);
  m.impl("split_add", &fastres::split_add_cuda);
}
