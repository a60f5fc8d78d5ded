// Host-side pieces shared by the CPU and CUDA kernels of se_gate_act (cpu/se.cpp, cuda/se.cu).
#pragma once

#include "act.h"
#include "bn_act.h"

namespace fastres {

// sigmoid(gate) in x's opmath type, (N, C) contiguous, after checking gate against x.
inline Tensor gate_sigmoid(const Tensor& x, const Tensor& gate, at::ScalarType opmath) {
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(1),
              "fastres: gate must be (N, C) = (", x.size(0), ", ", x.size(1), "), got ", gate.sizes());
  TORCH_CHECK(gate.device() == x.device(), "fastres: gate must be on x's device ", x.device());
  return at::sigmoid(gate.to(opmath)).contiguous();
}

// The saved output the relu family's backward reads its mask from (required: the SE backward
// does not recompute it); undefined for the other activations.
inline Tensor se_saved_output(const Inputs& in, const OptTensor& out, Act act) {
  const bool masks = act == Act::Relu || act == Act::Relu6;
  TORCH_CHECK(!masks || present(out), "fastres: se_gate_act_backward needs the saved output for relu and relu6");
  return saved_output(in, out, masks);
}

}  // namespace fastres
