// gradient_combine(grads[K, P] float32, weights[C, K] float64, boundaries[C + 1], out[P] float32):
// out[p] = sum_k weights[c, k] * grads[k, p] for the columns p of segment c.
//
// The second pass of flattened gradient surgery. PCGrad's projected gradients, main + auxiliary
// weighting and plain summation are all linear combinations of the task rows, so whatever the
// method decided from the Gram matrix (mtbert/optim/combine.py) is applied here in one pass,
// segment by segment (shared encoder with the surgery weights, each head with its own task's).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "flat_buffer.h"

namespace mtbert {

namespace {

// 16384 float64 partial sums (128 KiB) stay in L2 while each task row is added into them; long
// runs per row keep the hardware prefetcher streaming.
constexpr int64_t kCombinePiece = 16384;

// Row by row into a float64 accumulator keeps each loop a simple vectorizable axpy while the
// piece stays in L1; the sum is rounded to float32 once.
MTBERT_VECTOR_CLONES
void combine_piece(const float* g, int64_t K, int64_t P, const double* weights, int64_t begin, int64_t end,
                   float* out) {
  double acc[kCombinePiece];
  const int64_t len = end - begin;
#pragma omp simd
  for (int64_t p = 0; p < len; ++p) acc[p] = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double wk = weights[k];
    if (wk == 0.0) continue;  // a head's columns take only their own task's row
    const float* gk = g + k * P + begin;
#pragma omp simd
    for (int64_t p = 0; p < len; ++p) acc[p] += wk * static_cast<double>(gk[p]);
  }
#pragma omp simd
  for (int64_t p = 0; p < len; ++p) out[begin + p] = static_cast<float>(acc[p]);
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
  for_each_piece(static_cast<int64_t>(pieces.size()), K * P, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q) {
      combine_piece(g, K, P, w + pieces[q].segment * K, pieces[q].begin, pieces[q].end, o);
    }
  });
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("gradient_combine(Tensor grads, Tensor weights, int[] boundaries, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("gradient_combine", &gradient_combine_cpu);
}

}  // namespace mtbert
