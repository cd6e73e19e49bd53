// gradient_gram(grads[K, P] float32) -> G[K, K] float64, G[i][j] = <g_i, g_j>.
// The first of the two passes of flattened gradient surgery (PCGrad and friends): every
// combined gradient is a linear combination of the rows, so the K x K Gram matrix is all the
// projections need. Products are accumulated in float64 so that nearly orthogonal or nearly
// opposite gradients keep their sign.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace mtbert {

namespace {

constexpr int64_t kChunk = 1 << 14;  // columns per task: big enough to amortise, small enough for L1/L2

void gram_chunk(const float* g, int64_t K, int64_t P, int64_t begin, int64_t end, double* acc) {
  for (int64_t i = 0; i < K; ++i) {
    const float* gi = g + i * P;
    for (int64_t j = i; j < K; ++j) {
      const float* gj = g + j * P;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t p = begin; p < end; ++p) sum += static_cast<double>(gi[p]) * static_cast<double>(gj[p]);
      acc[i * K + j] += sum;
    }
  }
}

}  // namespace

at::Tensor gradient_gram_cpu(const at::Tensor& grads) {
  TORCH_CHECK(grads.dim() == 2, "grads must be 2-D [K, P], got ", grads.dim(), " dimensions");
  TORCH_CHECK(grads.scalar_type() == at::kFloat, "grads must be float32, got ", grads.scalar_type());
  TORCH_CHECK(grads.device().is_cpu(), "grads must be a CPU tensor, got ", grads.device());
  TORCH_CHECK(grads.is_contiguous(), "grads must be contiguous");
  const int64_t K = grads.size(0), P = grads.size(1);
  const float* g = grads.data_ptr<float>();
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  // Each chunk writes its own K x K partial; summing them in order keeps the result deterministic.
  std::vector<double> partial(static_cast<size_t>(chunks * K * K), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      gram_chunk(g, K, P, c * kChunk, std::min(P, (c + 1) * kChunk), partial.data() + c * K * K);
    }
  });
  at::Tensor out = at::zeros({K, K}, grads.options().dtype(at::kDouble));
  double* G = out.data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = 0; e < K * K; ++e) G[e] += partial[c * K * K + e];
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < i; ++j) G[i * K + j] = G[j * K + i];
  return out;
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("gradient_gram(Tensor grads) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("gradient_gram", &gradient_gram_cpu);
}

}  // namespace mtbert
