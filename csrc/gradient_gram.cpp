// gradient_gram(grads[K, P] float32, boundaries[C + 1]) -> G[C, K, K] float64,
// G[c, i, j] = sum over the columns p of segment c (boundaries[c] <= p < boundaries[c + 1]) of
// grads[i, p] * grads[j, p].
//
// The first of the two passes of flattened gradient surgery (PCGrad and friends): every combined
// gradient is a linear combination of the task rows, so the K x K Gram matrix of each segment
// (e.g. the shared encoder, then each task's head) is all the projections need. Products are
// accumulated in float64 so that nearly orthogonal or nearly opposite gradients keep their sign.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "flat_buffer.h"
#include "float_vectors.h"

namespace mtbert {

namespace {

// Columns per piece: the unit of parallel work and of the fixed-order reduction. Long pieces keep the
// hardware prefetcher streaming on the K rows; the partials they leave (K x K float64 each) stay few.
constexpr int64_t kGramPiece = 16384;

// The Gram matrix of K rows (K fixed at compile time, row r at g + r * row_stride) over the columns
// [begin, end), written to acc[i * acc_stride + j] for i <= j. One sweep reads the K rows together:
// each element is widened to float64 once and the K (K + 1) / 2 products accumulate in vector
// registers, so memory is read once, at the rate of the prefetcher, whatever the number of pairs.
template <int K>
MTBERT_ALWAYS_INLINE void gram_rows(const float* g, int64_t row_stride, int64_t begin, int64_t end, double* acc,
                                    int64_t acc_stride) {
  constexpr int kPairs = K * (K + 1) / 2;
  Doubles8 sum[kPairs] = {};
  int64_t p = begin;
  for (; p + kLanes <= end; p += kLanes) {
    Doubles8 x[K];
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) x[i] = load_as_double(g + i * row_stride + p);
    int q = 0;
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
      for (int j = i; j < K; ++j) sum[q++] += x[i] * x[j];
    }
  }
  int q = 0;
  for (int i = 0; i < K; ++i) {
    for (int j = i; j < K; ++j, ++q) {
      double total = 0.0;
      for (int lane = 0; lane < kLanes; ++lane) total += sum[q][lane];
      for (int64_t r = p; r < end; ++r) {
        total += static_cast<double>(g[i * row_stride + r]) * static_cast<double>(g[j * row_stride + r]);
      }
      acc[i * acc_stride + j] = total;
    }
  }
}

// The cross products of two row blocks over the columns [begin, end): rows a[0..A) (at a + i * row_stride)
// against rows b[0..B), written to acc[i * acc_stride + j]. Like gram_rows, one sweep: the A + B rows
// are widened once per vector and the A x B products accumulate in registers (at most 16 + 8 of the
// 32 AVX-512 vector registers for 4 x 4), summed lane by lane then tail in the order gram_rows uses.
template <int A, int B>
MTBERT_ALWAYS_INLINE void gram_cross(const float* a, const float* b, int64_t row_stride, int64_t begin, int64_t end,
                                     double* acc, int64_t acc_stride) {
  Doubles8 sum[A][B] = {};
  int64_t p = begin;
  for (; p + kLanes <= end; p += kLanes) {
    Doubles8 x[A], y[B];
#pragma GCC unroll 4
    for (int i = 0; i < A; ++i) x[i] = load_as_double(a + i * row_stride + p);
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j) y[j] = load_as_double(b + j * row_stride + p);
#pragma GCC unroll 4
    for (int i = 0; i < A; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < B; ++j) sum[i][j] += x[i] * y[j];
    }
  }
  for (int i = 0; i < A; ++i) {
    for (int j = 0; j < B; ++j) {
      double total = 0.0;
      for (int lane = 0; lane < kLanes; ++lane) total += sum[i][j][lane];
      for (int64_t r = p; r < end; ++r) {
        total += static_cast<double>(a[i * row_stride + r]) * static_cast<double>(b[j * row_stride + r]);
      }
      acc[i * acc_stride + j] = total;
    }
  }
}

// Above 8 rows the Gram is cut into blocks of kGramBlock rows (the last one smaller): a diagonal block
// is a gram_rows sweep, each pair of blocks a gram_cross sweep, so a piece is read from cache
// n (n + 1) / 2 times (n = ceil(K / 4) blocks: 6 at K = 10) instead of K (K + 1) / 2 times (55).
constexpr int64_t kGramBlock = 4;

// gram_cross<A, B> for a block of B = 1..4 rows.
template <int A>
MTBERT_ALWAYS_INLINE void gram_cross_rows(int64_t B, const float* a, const float* b, int64_t row_stride,
                                          int64_t begin, int64_t end, double* acc, int64_t acc_stride) {
  switch (B) {
    case 1: return gram_cross<A, 1>(a, b, row_stride, begin, end, acc, acc_stride);
    case 2: return gram_cross<A, 2>(a, b, row_stride, begin, end, acc, acc_stride);
    case 3: return gram_cross<A, 3>(a, b, row_stride, begin, end, acc, acc_stride);
    case 4: return gram_cross<A, 4>(a, b, row_stride, begin, end, acc, acc_stride);
  }
}

// acc[i * K + j] (i <= j) of one piece. K <= 8 (the tasks of multitask training) takes one sweep;
// larger K one sweep per block pair.
MTBERT_VECTOR_CLONES
void gram_piece(const float* g, int64_t K, int64_t P, int64_t begin, int64_t end, double* acc) {
  switch (K) {
    case 1: return gram_rows<1>(g, P, begin, end, acc, K);
    case 2: return gram_rows<2>(g, P, begin, end, acc, K);
    case 3: return gram_rows<3>(g, P, begin, end, acc, K);
    case 4: return gram_rows<4>(g, P, begin, end, acc, K);
    case 5: return gram_rows<5>(g, P, begin, end, acc, K);
    case 6: return gram_rows<6>(g, P, begin, end, acc, K);
    case 7: return gram_rows<7>(g, P, begin, end, acc, K);
    case 8: return gram_rows<8>(g, P, begin, end, acc, K);
  }
  for (int64_t a0 = 0; a0 < K; a0 += kGramBlock) {
    const int64_t A = std::min(kGramBlock, K - a0);
    const float* a = g + a0 * P;
    double* diagonal = acc + a0 * K + a0;
    switch (A) {
      case 1: gram_rows<1>(a, P, begin, end, diagonal, K); break;
      case 2: gram_rows<2>(a, P, begin, end, diagonal, K); break;
      case 3: gram_rows<3>(a, P, begin, end, diagonal, K); break;
      case 4: gram_rows<4>(a, P, begin, end, diagonal, K); break;
    }
    for (int64_t b0 = a0 + kGramBlock; b0 < K; b0 += kGramBlock) {
      const int64_t B = std::min(kGramBlock, K - b0);
      const float* b = g + b0 * P;
      // Only the last block is short, and it has no block after it: A == kGramBlock here.
      gram_cross_rows<kGramBlock>(B, a, b, P, begin, end, acc + a0 * K + b0, K);
    }
  }
}

}  // namespace

void check_gram_args(const at::Tensor& grads, c10::IntArrayRef boundaries) {
  check_float_buffer(grads, "grads", 2);
  check_boundaries(boundaries, grads.size(1), "boundaries");
}

at::Tensor gradient_gram_cpu(const at::Tensor& grads, c10::IntArrayRef boundaries) {
  check_gram_args(grads, boundaries);
  TORCH_CHECK(grads.device().is_cpu(), "grads must be a CPU tensor here, got ", grads.device());
  const int64_t K = grads.size(0), P = grads.size(1), C = static_cast<int64_t>(boundaries.size()) - 1;
  const float* g = grads.data_ptr<float>();
  const std::vector<Piece> pieces = cut_into_pieces(boundaries, kGramPiece);
  const int64_t n = static_cast<int64_t>(pieces.size());
  // Each piece writes its own K x K partial; summing them in piece order afterwards makes the
  // result independent of the number of threads.
  std::vector<double> partial(static_cast<size_t>(n * K * K), 0.0);
  for_each_piece(n, K * P, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q) {
      gram_piece(g, K, P, pieces[q].begin, pieces[q].end, partial.data() + q * K * K);
    }
  });
  at::Tensor out = at::zeros({C, K, K}, grads.options().dtype(at::kDouble));
  double* G = out.data_ptr<double>();
  for (int64_t q = 0; q < n; ++q) {
    double* Gc = G + pieces[q].segment * K * K;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = i; j < K; ++j) Gc[i * K + j] += partial[q * K * K + i * K + j];
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < i; ++j) G[(c * K + i) * K + j] = G[(c * K + j) * K + i];
  return out;
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("gradient_gram(Tensor grads, int[] boundaries) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("gradient_gram", &gradient_gram_cpu);
}

}  // namespace mtbert
