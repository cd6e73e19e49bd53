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

#include <vector>

#include "flat_buffer.h"

namespace mtbert {

namespace {

// Columns per piece: K rows of it (3 x 64 KiB at K = 3) stay in L2 while the K (K + 1) / 2 dot
// products re-read them, so memory is read once.
constexpr int64_t kGramPiece = 16384;

MTBERT_VECTOR_CLONES
void gram_piece(const float* g, int64_t K, int64_t P, int64_t begin, int64_t end, double* acc) {
  for (int64_t i = 0; i < K; ++i) {
    const float* gi = g + i * P;
    for (int64_t j = i; j < K; ++j) {
      const float* gj = g + j * P;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t p = begin; p < end; ++p) sum += static_cast<double>(gi[p]) * static_cast<double>(gj[p]);
      acc[i * K + j] = sum;
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
