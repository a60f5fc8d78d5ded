// CUDA kernels of fastres_native::se_gate_act and se_gate_act_backward:
//   out = act(x * s + residual), s = sigmoid(gate) per (image, channel), gate (N, C).
// The forward and the backward's elementwise grads are grid-stride kernels; the gate's grad
// sum_hw(dL/dz * x) * s * (1 - s) is one block per (image, channel): an NCHW plane is contiguous,
// a channels_last one strided by C. Math in opmath (fp32 for fp16/bf16).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../act.h"
#include "../bn_act.h"
#include "../se.h"
#include "launch.cuh"

namespace fastres {
namespace {

template <typename T>
struct SeArgs {
  using O = at::opmath_type<T>;
  const T *x, *r, *y, *dy;
  const O* s;  // sigmoid(gate), (N, C)
  T *out, *gx, *gres;
  int64_t C, HW;
  bool cl;

  // The (image * C + channel) index of element i.
  __device__ __forceinline__ int64_t gate_index(int64_t i) const {
    return cl ? (i / (C * HW)) * C + i % C : i / HW;
  }
};

template <typename T, Act A>
__global__ void se_gate_act_kernel(SeArgs<T> a, int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    O z = O(a.x[i]) * a.s[a.gate_index(i)];
    if (a.r) z += O(a.r[i]);
    a.out[i] = T(act_forward<A>(z));
  }
}

// dL/dz at element i, gate value g there.
template <Act A, typename T>
__device__ __forceinline__ at::opmath_type<T> se_grad_z(const SeArgs<T>& a, int64_t i, at::opmath_type<T> g) {
  using O = at::opmath_type<T>;
  O gz = O(a.dy[i]);
  if constexpr (needs_input(A)) {
    O z = O(a.x[i]) * g;
    if (a.r) z += O(a.r[i]);
    gz = act_backward<A>(gz, z);
  } else if constexpr (A != Act::Identity) {
    gz = act_backward<A>(gz, O(a.y[i]));
  }
  return gz;
}

template <typename T, Act A>
__global__ void se_gate_act_grad_kernel(SeArgs<T> a, int64_t n) {
  using O = at::opmath_type<T>;
  FASTRES_GRID_STRIDE(i, n) {
    const O g = a.s[a.gate_index(i)];
    const O gz = se_grad_z<A>(a, i, g);
    if (a.gres) a.gres[i] = T(gz);
    a.gx[i] = T(gz * g);
  }
}

// One block per (image, channel) plane: sum over it of dL/dz * x, times sigmoid'(gate).
template <typename T, Act A>
__global__ void se_gate_grad_kernel(SeArgs<T> a, at::opmath_type<T>* ggate) {
  using O = at::opmath_type<T>;
  __shared__ O partial[kThreads];
  const int64_t plane = blockIdx.x, img = plane / a.C, c = plane % a.C;
  const O g = a.s[plane];
  O acc = 0;
  for (int64_t k = threadIdx.x; k < a.HW; k += blockDim.x) {
    const int64_t i = a.cl ? (img * a.HW + k) * a.C + c : plane * a.HW + k;
    acc += se_grad_z<A>(a, i, g) * O(a.x[i]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {  // fixed tree order: deterministic
    if (threadIdx.x < w) partial[threadIdx.x] += partial[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) ggate[plane] = partial[0] * g * (O(1) - g);
}

struct SeCall {
  Inputs in;
  Tensor s;
};

SeCall se_prepare(const Tensor& x, const Tensor& gate, const OptTensor& residual) {
  SeCall call{prepare(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, residual, 1), {}};
  call.s = gate_sigmoid(x, gate, call.in.opmath);
  return call;
}

template <typename T>
SeArgs<T> se_args(const SeCall& call) {
  SeArgs<T> a{};
  a.x = call.in.x.const_data_ptr<T>();
  a.r = call.in.residual.defined() ? call.in.residual.const_data_ptr<T>() : nullptr;
  a.s = call.s.const_data_ptr<at::opmath_type<T>>();
  a.C = call.in.layout.C, a.HW = call.in.layout.HW, a.cl = call.in.layout.cl;
  return a;
}

Tensor se_gate_act_cuda(const Tensor& x, const Tensor& gate, const OptTensor& residual, c10::string_view act) {
  c10::cuda::CUDAGuard guard(x.device());
  SeCall call = se_prepare(x, gate, residual);
  Tensor y = at::empty_like(call.in.x);
  const int64_t n = y.numel();
  if (n == 0) return y;
  FASTRES_DISPATCH(x.scalar_type(), parse_act(std::string(act)), "se_gate_act_cuda", {
    SeArgs<scalar_t> a = se_args<scalar_t>(call);
    a.out = y.mutable_data_ptr<scalar_t>();
    se_gate_act_kernel<scalar_t, kAct><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> se_gate_act_backward_cuda(const Tensor& grad_, const Tensor& x,
                                                            const Tensor& gate, const OptTensor& residual,
                                                            const OptTensor& out, c10::string_view act_name) {
  c10::cuda::CUDAGuard guard(x.device());
  const Act act = parse_act(std::string(act_name));
  SeCall call = se_prepare(x, gate, residual);
  Tensor grad = call.in.like_x(grad_, "grad");
  Tensor saved_out = se_saved_output(call.in, out, act);
  Tensor gx = at::empty_like(call.in.x);
  Tensor gres = present(residual) ? at::empty_like(call.in.x) : Tensor();
  Tensor ggate = at::empty({x.size(0), x.size(1)}, call.s.options());
  const int64_t n = gx.numel();
  FASTRES_DISPATCH(x.scalar_type(), act, "se_gate_act_backward_cuda", {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    SeArgs<scalar_t> a = se_args<scalar_t>(call);
    a.dy = grad.const_data_ptr<scalar_t>();
    a.y = saved_out.defined() ? saved_out.const_data_ptr<scalar_t>() : nullptr;
    a.gx = gx.mutable_data_ptr<scalar_t>();
    a.gres = gres.defined() ? gres.mutable_data_ptr<scalar_t>() : nullptr;
    if (n > 0) {
      se_gate_act_grad_kernel<scalar_t, kAct><<<grid_for(n), kThreads, 0, stream>>>(a, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (ggate.numel() > 0) {
      se_gate_grad_kernel<scalar_t, kAct><<<unsigned(ggate.numel()), kThreads, 0, stream>>>(
          a, ggate.mutable_data_ptr<at::opmath_type<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, ggate.to(gate.scalar_type()), gres.defined() ? gres : at::empty({0}, grad_.options())};
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres_native, CUDA, m) {
  m.impl("se_gate_act", &fastres::se_gate_act_cuda);
  m.impl("se_gate_act_backward", &fastres::se_gate_act_backward_cuda);
}
