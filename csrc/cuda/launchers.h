// Plain-CUDA launchers of the flat-buffer kernels (raw pointers, a stream, no torch headers), so
// the .cu files compile with nvcc alone; bindings.cpp checks the tensors and calls them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../adamw.h"
#include "../pieces.h"

namespace mtbert {
namespace cuda {

constexpr int kMaxTasks = 8;       // rows K of a gradient buffer
constexpr int kMaxSegments = 16;   // segments C of a gradient buffer (shared + one per task)
constexpr int kThreads = 256;

// Segment c is columns [boundaries[c], boundaries[c + 1]); it is cut into pieces of `piece_columns`
// columns, the pieces of segment c being numbered from first_piece[c]. Passed by value.
struct SegmentTable {
  int64_t boundaries[kMaxSegments + 1];
  int64_t first_piece[kMaxSegments + 1];
  int64_t piece_columns;
  int count;
};

// Host helper: fills `table` and returns the total number of pieces.
int64_t make_segment_table(const int64_t* boundaries, int count, int64_t piece_columns, SegmentTable* table);

// partial: [num_pieces, K, K] float64 scratch; out: [C, K, K] float64.
cudaError_t launch_gradient_gram(const float* grads, int64_t K, int64_t P, const SegmentTable& table,
                                 int64_t num_pieces, double* partial, double* out, cudaStream_t stream);

// weights: [C, K] float64 on the host, copied into the kernel's arguments.
cudaError_t launch_gradient_combine(const float* grads, int64_t K, int64_t P, const SegmentTable& table,
                                    const double* weights, float* out, cudaStream_t stream);

// pieces: [num_pieces] and scalars: [segments], both in device memory.
cudaError_t launch_adamw(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, const Piece* pieces,
                         int64_t num_pieces, const AdamWScalars* scalars, AdamWFormula formula, cudaStream_t stream);

}  // namespace cuda
}  // namespace mtbert
