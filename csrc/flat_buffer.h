// What the flat-buffer ops (gradient_gram, gradient_combine, adamw_step) share: argument checks, so
// every op rejects bad input with the same message naming the argument; the cutting of segments
// into pieces of parallel work; and the multiversioning of their inner loops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "pieces.h"

// Inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
// function multiversioning), so one binary uses the widest vectors of the machine it runs on.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MTBERT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MTBERT_VECTOR_CLONES
#endif

namespace mtbert {

inline void check_float_buffer(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), " dimensions (shape ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (a flat buffer), got strides ", t.strides());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

// Column boundaries of the segments of a flat buffer: 0 = b[0] <= b[1] <= ... <= b[C] = columns.
inline void check_boundaries(c10::IntArrayRef boundaries, int64_t columns, const char* name) {
  TORCH_CHECK(boundaries.size() >= 2, name, " must hold at least [0, P], got ", boundaries);
  TORCH_CHECK(boundaries.front() == 0 && boundaries.back() == columns, name, " must start at 0 and end at P = ",
              columns, ", got ", boundaries);
  for (size_t c = 1; c < boundaries.size(); ++c) {
    TORCH_CHECK(boundaries[c - 1] <= boundaries[c], name, " must be non-decreasing, got ", boundaries);
  }
}

// Segment c of a buffer cut by `boundaries` is columns [boundaries[c], boundaries[c + 1]).
inline std::vector<Piece> cut_into_pieces(c10::IntArrayRef boundaries, int64_t piece) {
  return cut_into_pieces(static_cast<int64_t>(boundaries.size()) - 1, piece,
                         [boundaries](int64_t c) { return std::make_pair(boundaries[c], boundaries[c + 1]); });
}

// Runs body(first, last) over pieces [0, count): on the calling thread when the whole job is small
// (a thread team costs more than it saves there, and far more on a busy machine), in parallel otherwise.
constexpr int64_t kParallelColumns = 1 << 16;

template <typename Body>
void for_each_piece(int64_t count, int64_t total_columns, const Body& body) {
  if (count == 0) return;
  if (total_columns < kParallelColumns || count == 1) {
    body(0, count);
  } else {
    at::parallel_for(0, count, 1, body);
  }
}

// The argument checks of each op, defined next to its CPU kernel and reused by the CUDA bindings.
void check_gram_args(const at::Tensor& grads, c10::IntArrayRef boundaries);
void check_combine_args(const at::Tensor& grads, const at::Tensor& weights, c10::IntArrayRef boundaries,
                        const at::Tensor& out);
void check_adamw_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& grad, const at::Tensor& segments, double lr, double beta1, double beta2,
                      double eps, double weight_decay);

}  // namespace mtbert
