// out[p] = sum_k weights[c, k] grads[k, p] for the columns p of segment c (see ../gradient_combine.cpp), CUDA.
// Grid-stride over groups of 4 columns with 16-byte vector loads; the weights travel in the kernel
// arguments. Sums in float64, rounded once.
#include <cuda_runtime.h>

#include "launchers.h"

namespace mtbert {
namespace cuda {

namespace {

struct CombineWeights {
  double w[kMaxSegments][kMaxTasks];
};

__device__ __forceinline__ int segment_of_column(const SegmentTable& t, int64_t col) {
  int c = 0;
  while (c + 1 < t.count && t.boundaries[c + 1] <= col) ++c;
  return c;
}

__global__ void combine_kernel(const float* __restrict__ grads, int64_t K, int64_t P, SegmentTable table,
                               CombineWeights weights, float* __restrict__ out) {
  const bool vector_ok = (P % 4 == 0) && (reinterpret_cast<uintptr_t>(grads) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t groups = (P + 3) / 4;
  for (int64_t group = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; group < groups;
       group += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = 4 * group;
    const int c = segment_of_column(table, col);
    if (vector_ok && col + 3 < table.boundaries[c + 1]) {
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
      for (int k = 0; k < kMaxTasks; ++k) {
        if (k >= K) break;
        const double w = weights.w[c][k];
        const float4 g = *reinterpret_cast<const float4*>(grads + k * P + col);
        acc[0] += w * g.x;
        acc[1] += w * g.y;
        acc[2] += w * g.z;
        acc[3] += w * g.w;
      }
      *reinterpret_cast<float4*>(out + col) = make_float4(static_cast<float>(acc[0]), static_cast<float>(acc[1]),
                                                          static_cast<float>(acc[2]), static_cast<float>(acc[3]));
    } else {
      for (int64_t p = col; p < min(col + 4, P); ++p) {
        const int cp = segment_of_column(table, p);
        double acc = 0.0;
        for (int k = 0; k < K; ++k) acc += weights.w[cp][k] * grads[k * P + p];
        out[p] = static_cast<float>(acc);
      }
    }
  }
}

}  // namespace

cudaError_t launch_gradient_combine(const float* grads, int64_t K, int64_t P, const SegmentTable& table,
                                    const double* weights, float* out, cudaStream_t stream) {
  if (P == 0) return cudaSuccess;
  CombineWeights w{};
  for (int c = 0; c < table.count; ++c)
    for (int64_t k = 0; k < K; ++k) w.w[c][k] = weights[c * K + k];
  const int64_t groups = (P + 3) / 4;
  const int blocks = static_cast<int>(min((groups + kThreads - 1) / kThreads, static_cast<int64_t>(65535)));
  combine_kernel<<<blocks, kThreads, 0, stream>>>(grads, K, P, table, w, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mtbert
