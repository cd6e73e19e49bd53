// gradient_combine(grads[K, P] float32, weights[C, K] float64, boundaries[C + 1], out[P] float32):
// out[p] = sum_k weights[c, k] * grads[k, p] for the columns p of segment c.
//
// The second pass of flattened gradient surgery. PCGrad's projected gradients, main + auxiliary
// weighting and plain summation are all linear combinations of the task rows, so whatever the
// method decided from the Gram matrix (mtbert/optim/combine.py) is applied here in one pass,
// segment by segment (shared encoder with the surgery weights, each head with its own task's).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "flat_buffer.h"
#include "float_vectors.h"

namespace mtbert {

namespace {

// Columns per piece: the unit of parallel work; long pieces keep the prefetcher streaming on each row.
constexpr int64_t kCombinePiece = 16384;

// Outputs at least this large are written with non-temporal stores: they cannot stay in the caches
// (the rows read alongside are K times larger), and streaming skips reading each line before it is
// overwritten. Smaller outputs are stored normally, to be found in cache by the optimizer step.
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

// out[p] = sum_r weight[r] * rows[r][p] over [begin, end) for R rows (R fixed at compile time): one
// sweep reads the R rows together and writes out once, accumulating in float64 registers and
// rounding to float32 once.
template <int R, bool kStream>
MTBERT_ALWAYS_INLINE void combine_rows(const float* const* rows, const double* weight, int64_t begin, int64_t end,
                                       float* out) {
  auto column = [&](int64_t p) {
    double acc = 0.0;
    for (int r = 0; r < R; ++r) acc += weight[r] * static_cast<double>(rows[r][p]);
    out[p] = static_cast<float>(acc);
  };
  int64_t p = begin;
  if (kStream) {  // non-temporal stores need 16-byte aligned addresses
    for (; p < end && reinterpret_cast<uintptr_t>(out + p) % 16 != 0; ++p) column(p);
  }
  for (; p + kLanes <= end; p += kLanes) {
    Doubles8 acc = {};
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc += weight[r] * load_as_double(rows[r] + p);
    if (kStream) {
      stream_as_float(out + p, acc);
    } else {
      store_as_float(out + p, acc);
    }
  }
  for (; p < end; ++p) column(p);
}

template <bool kStream>
MTBERT_ALWAYS_INLINE void combine_count(int count, const float* const* rows, const double* weight, int64_t begin,
                                        int64_t end, float* out) {
  switch (count) {
    case 0: std::fill(out + begin, out + end, 0.0f); return;
    case 1: return combine_rows<1, kStream>(rows, weight, begin, end, out);
    case 2: return combine_rows<2, kStream>(rows, weight, begin, end, out);
    case 3: return combine_rows<3, kStream>(rows, weight, begin, end, out);
    case 4: return combine_rows<4, kStream>(rows, weight, begin, end, out);
    case 5: return combine_rows<5, kStream>(rows, weight, begin, end, out);
    case 6: return combine_rows<6, kStream>(rows, weight, begin, end, out);
    case 7: return combine_rows<7, kStream>(rows, weight, begin, end, out);
    case 8: return combine_rows<8, kStream>(rows, weight, begin, end, out);
  }
}

// One piece of one segment with the segment's weights over the K rows. Rows of weight 0 are not
// read (a head's columns take only their own task's row).
MTBERT_VECTOR_CLONES
void combine_piece(const float* g, int64_t K, int64_t P, const double* weights, int64_t begin, int64_t end,
                   bool stream, float* out) {
  constexpr int kMaxFused = 8;
  const float* rows[kMaxFused];
  double weight[kMaxFused];
  int count = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (weights[k] == 0.0) continue;
    if (count == kMaxFused) {  // more than 8 rows: fold the first 8 into out (rounded to float32 there)
      combine_count<false>(count, rows, weight, begin, end, out);
      rows[0] = out;
      weight[0] = 1.0;
      count = 1;
    }
    rows[count] = g + k * P;
    weight[count] = weights[k];
    ++count;
  }
  if (stream) {
    combine_count<true>(count, rows, weight, begin, end, out);
  } else {
    combine_count<false>(count, rows, weight, begin, end, out);
  }
}

}  // namespace

void check_combine_args(const at::Tensor& grads, const at::Tensor& weights, c10::IntArrayRef boundaries,
                        const at::Tensor& out) {
  check_float_buffer(grads, "grads", 2);
  check_float_buffer(out, "out", 1);
  check_same_device(out, "out", grads, "grads");
  const int64_t K = grads.size(0), P = grads.size(1);
  TORCH_CHECK(out.size(0) == P, "out must have P = ", P, " elements (grads.size(1)), got ", out.size(0));
  check_boundaries(boundaries, P, "boundaries");
  const int64_t C = static_cast<int64_t>(boundaries.size()) - 1;
  TORCH_CHECK(weights.scalar_type() == at::kDouble, "weights must be float64, got ", weights.scalar_type());
  TORCH_CHECK(weights.device().is_cpu(), "weights must be a CPU tensor (it is read by the host), got ",
              weights.device());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == C && weights.size(1) == K,
              "weights must have shape [C, K] = [", C, ", ", K, "] (one row per segment of boundaries), got ",
              weights.sizes());
  TORCH_CHECK(weights.is_contiguous(), "weights must be contiguous");
  const int64_t bytes = P * static_cast<int64_t>(sizeof(float));
  const char* o = static_cast<const char*>(out.data_ptr());
  const char* g = static_cast<const char*>(grads.data_ptr());
  TORCH_CHECK(P == 0 || o + bytes <= g || g + K * bytes <= o, "out must not overlap grads");
}

void gradient_combine_cpu(const at::Tensor& grads, const at::Tensor& weights, c10::IntArrayRef boundaries,
                          at::Tensor& out) {
  check_combine_args(grads, weights, boundaries, out);
  TORCH_CHECK(grads.device().is_cpu(), "grads must be a CPU tensor here, got ", grads.device());
  const int64_t K = grads.size(0), P = grads.size(1);
  const float* g = grads.data_ptr<float>();
  const double* w = weights.data_ptr<double>();
  float* o = out.data_ptr<float>();
  const std::vector<Piece> pieces = cut_into_pieces(boundaries, kCombinePiece);
  const bool stream = P * static_cast<int64_t>(sizeof(float)) >= kStreamingBytes;
  for_each_piece(static_cast<int64_t>(pieces.size()), K * P, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q) {
      combine_piece(g, K, P, w + pieces[q].segment * K, pieces[q].begin, pieces[q].end, stream, o);
    }
    if (stream) streaming_stores_done();
  });
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("gradient_combine(Tensor grads, Tensor weights, int[] boundaries, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("gradient_combine", &gradient_combine_cpu);
}

}  // namespace mtbert
