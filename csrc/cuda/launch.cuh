// Launch geometry shared by the CUDA kernels: blocks of kThreads threads, and grid-stride loops
// over n elements with enough blocks to fill any current GPU (the loop covers the rest).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastres {

constexpr int kThreads = 256;

inline int grid_for(int64_t n) { return int(std::min<int64_t>((n + kThreads - 1) / kThreads, 8192)); }

}  // namespace fastres

// for (i = this thread's first element; i < n; i += every thread of the grid)
#define FASTRES_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)
