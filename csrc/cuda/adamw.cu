// AdamW over the segments of a flat buffer (see ../adamw.cpp), CUDA. One block per piece
// (grid-stride over pieces), 16-byte vector loads in the aligned middle of a piece, scalar ends;
// the per-element math is ../adamw.h's, shared with the CPU kernel.
#include <cuda_runtime.h>

#include "launchers.h"

namespace mtbert {
namespace cuda {

namespace {

template <AdamWFormula kFormula>
__device__ __forceinline__ void update(float& p, float& m, float& v, float g, const AdamWScalars& s) {
  if constexpr (kFormula == AdamWFormula::kTorch) {
    adamw_torch(p, m, v, g, s);
  } else {
    adamw_handout(p, m, v, g, s);
  }
}

template <AdamWFormula kFormula>
__global__ void adamw_kernel(float* __restrict__ param, float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                             const float* __restrict__ grad, const Piece* __restrict__ pieces, int64_t num_pieces,
                             const AdamWScalars* __restrict__ scalars) {
  // All four buffers share the alignment of `param` only if each is 16-byte aligned.
  const bool vector_ok = ((reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(exp_avg) |
                           reinterpret_cast<uintptr_t>(exp_avg_sq) | reinterpret_cast<uintptr_t>(grad)) % 16) == 0;
  for (int64_t q = blockIdx.x; q < num_pieces; q += gridDim.x) {
    const Piece piece = pieces[q];
    const AdamWScalars s = scalars[piece.segment];
    const int64_t vec_begin = vector_ok ? min(piece.end, (piece.begin + 3) / 4 * 4) : piece.end;
    const int64_t vec_end = vector_ok ? max(vec_begin, piece.end / 4 * 4) : piece.end;
    for (int64_t i = piece.begin + threadIdx.x; i < vec_begin; i += blockDim.x)
      update<kFormula>(param[i], exp_avg[i], exp_avg_sq[i], grad[i], s);
    for (int64_t i = vec_begin + 4 * threadIdx.x; i < vec_end; i += 4 * blockDim.x) {
      float4 p = *reinterpret_cast<float4*>(param + i);
      float4 m = *reinterpret_cast<float4*>(exp_avg + i);
      float4 v = *reinterpret_cast<float4*>(exp_avg_sq + i);
      const float4 g = *reinterpret_cast<const float4*>(grad + i);
      update<kFormula>(p.x, m.x, v.x, g.x, s);
      update<kFormula>(p.y, m.y, v.y, g.y, s);
      update<kFormula>(p.z, m.z, v.z, g.z, s);
      update<kFormula>(p.w, m.w, v.w, g.w, s);
      *reinterpret_cast<float4*>(param + i) = p;
      *reinterpret_cast<float4*>(exp_avg + i) = m;
      *reinterpret_cast<float4*>(exp_avg_sq + i) = v;
    }
    for (int64_t i = vec_end + threadIdx.x; i < piece.end && vector_ok; i += blockDim.x)
      update<kFormula>(param[i], exp_avg[i], exp_avg_sq[i], grad[i], s);
  }
}

}  // namespace

cudaError_t launch_adamw(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, const Piece* pieces,
                         int64_t num_pieces, const AdamWScalars* scalars, AdamWFormula formula, cudaStream_t stream) {
  if (num_pieces == 0) return cudaSuccess;
  const int blocks = static_cast<int>(min(num_pieces, static_cast<int64_t>(65535)));
  if (formula == AdamWFormula::kTorch) {
    adamw_kernel<AdamWFormula::kTorch>
        <<<blocks, kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, grad, pieces, num_pieces, scalars);
  } else {
    adamw_kernel<AdamWFormula::kHandout>
        <<<blocks, kThreads, 0, stream>>>(param, exp_avg, exp_avg_sq, grad, pieces, num_pieces, scalars);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mtbert
