// Per-segment Gram matrices of a [K, P] gradient buffer (see ../gradient_gram.cpp), CUDA.
// One block per piece of a segment (grid-stride over pieces): each thread accumulates the
// K (K + 1) / 2 products of its columns in float64 from 16-byte vector loads, the block reduces
// them, and a second tiny kernel sums the pieces of each segment in order (deterministic, no atomics).
#include <cuda_runtime.h>

#include "launchers.h"

namespace mtbert {
namespace cuda {

namespace {

constexpr int kPairs = kMaxTasks * (kMaxTasks + 1) / 2;

__device__ __forceinline__ int segment_of_piece(const SegmentTable& t, int64_t piece) {
  int c = 0;
  while (c + 1 < t.count && t.first_piece[c + 1] <= piece) ++c;
  return c;
}

__device__ __forceinline__ void accumulate_column(const float* __restrict__ grads, int64_t K, int64_t P, int64_t col,
                                                  double* acc) {
  double x[kMaxTasks];
#pragma unroll
  for (int i = 0; i < kMaxTasks; ++i) x[i] = i < K ? static_cast<double>(grads[i * P + col]) : 0.0;
  int pair = 0;
#pragma unroll
  for (int i = 0; i < kMaxTasks; ++i)
#pragma unroll
    for (int j = i; j < kMaxTasks; ++j) acc[pair++] += x[i] * x[j];
}

__global__ void gram_partial_kernel(const float* __restrict__ grads, int64_t K, int64_t P, SegmentTable table,
                                    int64_t num_pieces, double* __restrict__ partial) {
  __shared__ double shared[kThreads / 32][kPairs];
  for (int64_t piece = blockIdx.x; piece < num_pieces; piece += gridDim.x) {
    const int c = segment_of_piece(table, piece);
    const int64_t begin = table.boundaries[c] + (piece - table.first_piece[c]) * table.piece_columns;
    const int64_t end = min(begin + table.piece_columns, table.boundaries[c + 1]);
    double acc[kPairs];
#pragma unroll
    for (int q = 0; q < kPairs; ++q) acc[q] = 0.0;
    // float4 loads need every row start and the piece start on a 16-byte boundary.
    const bool vector_ok = (P % 4 == 0) && (reinterpret_cast<uintptr_t>(grads) % 16 == 0);
    int64_t vec_begin = vector_ok ? min(end, (begin + 3) / 4 * 4) : end;
    int64_t vec_end = vector_ok ? max(vec_begin, end / 4 * 4) : end;
    for (int64_t col = begin + threadIdx.x; col < vec_begin; col += blockDim.x)
      accumulate_column(grads, K, P, col, acc);
    for (int64_t col = vec_begin + 4 * threadIdx.x; col < vec_end; col += 4 * blockDim.x) {
      float4 x[kMaxTasks];
#pragma unroll
      for (int i = 0; i < kMaxTasks; ++i)
        x[i] = i < K ? *reinterpret_cast<const float4*>(grads + i * P + col) : make_float4(0.f, 0.f, 0.f, 0.f);
      int pair = 0;
#pragma unroll
      for (int i = 0; i < kMaxTasks; ++i)
#pragma unroll
        for (int j = i; j < kMaxTasks; ++j)
          acc[pair++] += static_cast<double>(x[i].x) * x[j].x + static_cast<double>(x[i].y) * x[j].y +
                         static_cast<double>(x[i].z) * x[j].z + static_cast<double>(x[i].w) * x[j].w;
    }
    for (int64_t col = max(vec_end, vec_begin) + threadIdx.x; col < end && vector_ok; col += blockDim.x)
      accumulate_column(grads, K, P, col, acc);
    // Warp shuffle, then one value per warp in shared memory, then warp 0 sums in a fixed order.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      double v = acc[q];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) shared[warp][q] = v;
    }
    __syncthreads();
    if (threadIdx.x < kPairs) {
      double v = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) v += shared[w][threadIdx.x];
      int i = 0, j = threadIdx.x;  // unpack the pair index into (i, j), j >= i, over kMaxTasks
      while (j >= kMaxTasks - i) {
        j -= kMaxTasks - i;
        ++i;
      }
      j += i;
      if (i < K && j < K) partial[(piece * K + i) * K + j] = v;
    }
    __syncthreads();
  }
}

__global__ void gram_reduce_kernel(const double* __restrict__ partial, int64_t K, SegmentTable table,
                                   double* __restrict__ out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= table.count * K * K) return;
  const int64_t c = e / (K * K), i = (e / K) % K, j = e % K;
  const int64_t a = min(i, j), b = max(i, j);
  double sum = 0.0;
  for (int64_t piece = table.first_piece[c]; piece < table.first_piece[c + 1]; ++piece)
    sum += partial[(piece * K + a) * K + b];
  out[e] = sum;
}

}  // namespace

int64_t make_segment_table(const int64_t* boundaries, int count, int64_t piece_columns, SegmentTable* table) {
  table->count = count;
  table->piece_columns = piece_columns;
  int64_t pieces = 0;
  for (int c = 0; c <= count; ++c) {
    table->boundaries[c] = boundaries[c];
    table->first_piece[c] = pieces;
    if (c < count) pieces += (boundaries[c + 1] - boundaries[c] + piece_columns - 1) / piece_columns;
  }
  return pieces;
}

cudaError_t launch_gradient_gram(const float* grads, int64_t K, int64_t P, const SegmentTable& table,
                                 int64_t num_pieces, double* partial, double* out, cudaStream_t stream) {
  if (num_pieces > 0) {
    const int blocks = static_cast<int>(min(num_pieces, static_cast<int64_t>(65535)));
    gram_partial_kernel<<<blocks, kThreads, 0, stream>>>(grads, K, P, table, num_pieces, partial);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t entries = table.count * K * K;
  gram_reduce_kernel<<<static_cast<int>((entries + kThreads - 1) / kThreads), kThreads, 0, stream>>>(partial, K, table,
                                                                                                    out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mtbert
