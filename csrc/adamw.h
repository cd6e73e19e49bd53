// The AdamW update of one element, shared by the CPU loop (adamw.cpp) and mirrored by the CUDA
// kernel (cuda/adamw.cu), and the per-segment scalars it needs.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace mtbert {

// Per-segment constants, computed once in double precision on the host and rounded to float,
// the precision of torch.optim.AdamW's tensor-scalar ops.
struct AdamWScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  float step_size;              // handout: alpha_t; torch: lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // torch only: sqrt(1 - beta2^t)
  float decay;                  // handout: lr * weight_decay; torch: 1 - lr * weight_decay
};

enum class AdamWFormula : int64_t { kHandout = 0, kTorch = 1 };

// "handout" or "torch" -> the enum; anything else is an error naming `formula` (adamw.cpp).
AdamWFormula parse_formula(const std::string& formula);

inline AdamWScalars adamw_scalars(AdamWFormula formula, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, bool correct_bias, int64_t step) {
  AdamWScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  if (formula == AdamWFormula::kTorch) {
    s.step_size = static_cast<float>(lr / bias_correction1);
    s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
    s.decay = static_cast<float>(1.0 - lr * weight_decay);
  } else {
    // Kingma & Ba (2015) end of section 2: alpha_t = alpha * sqrt(1 - beta2^t) / (1 - beta1^t).
    s.step_size = static_cast<float>(correct_bias ? lr * std::sqrt(bias_correction2) / bias_correction1 : lr);
    s.bias_correction2_sqrt = 1.0f;
    s.decay = static_cast<float>(lr * weight_decay);
  }
  return s;
}

// The scalars of each row (begin, end, step) of an adamw_step `segments` table [count, 3].
inline std::vector<AdamWScalars> segment_scalars(const int64_t* rows, int64_t count, AdamWFormula formula, double lr,
                                                 double beta1, double beta2, double eps, double weight_decay,
                                                 bool correct_bias) {
  std::vector<AdamWScalars> scalars;
  scalars.reserve(count);
  for (int64_t s = 0; s < count; ++s) {
    scalars.push_back(adamw_scalars(formula, lr, beta1, beta2, eps, weight_decay, correct_bias, rows[3 * s + 2]));
  }
  return scalars;
}

#if defined(__CUDACC__)
#define MTBERT_HOST_DEVICE __host__ __device__ __forceinline__
#define MTBERT_SQRTF sqrtf
#else
#define MTBERT_HOST_DEVICE inline
#define MTBERT_SQRTF std::sqrt
#endif

// CS224N handout: m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; theta <- theta - alpha_t m / (sqrt(v) + eps);
// then decoupled decay on the updated theta: theta <- theta - lr * lambda * theta.
MTBERT_HOST_DEVICE void adamw_handout(float& p, float& m, float& v, float g, const AdamWScalars& s) {
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  p = p - s.step_size * (m / (MTBERT_SQRTF(v) + s.eps));
  p = p - s.decay * p;
}

// torch.optim.AdamW (single-tensor path), operation for operation: param.mul_(1 - lr wd);
// exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2);
// denom = sqrt(exp_avg_sq) / sqrt(bc2) + eps; param.addcdiv_(exp_avg, denom, -lr / bc1).
MTBERT_HOST_DEVICE void adamw_torch(float& p, float& m, float& v, float g, const AdamWScalars& s) {
  p = p * s.decay;
  m = m + s.one_minus_beta1 * (g - m);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = MTBERT_SQRTF(v) / s.bias_correction2_sqrt + s.eps;
  p = p + (-s.step_size) * (m / denom);
}

}  // namespace mtbert
