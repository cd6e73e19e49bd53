// adamw_step(param, exp_avg, exp_avg_sq, grad: [N] float32, segments: [S, 3] int64 (begin, end, step),
//            lr, beta1, beta2, eps, weight_decay, correct_bias, formula) -> () (updates in place)
//
// One call updates every segment [begin, end) of a flat parameter buffer with its own step count
// (for the bias correction), so one launch covers a whole parameter group however its parameters
// are scattered in the buffer. Columns outside the segments (parameters without a gradient, other
// groups) are left untouched. The update formulas are in adamw.h.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "adamw.h"
#include "flat_buffer.h"

namespace mtbert {

namespace {

constexpr int64_t kAdamWPiece = 1 << 14;

MTBERT_VECTOR_CLONES
void adamw_piece_torch(float* p, float* m, float* v, const float* g, int64_t begin, int64_t end, AdamWScalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) adamw_torch(p[i], m[i], v[i], g[i], s);
}

MTBERT_VECTOR_CLONES
void adamw_piece_handout(float* p, float* m, float* v, const float* g, int64_t begin, int64_t end, AdamWScalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) adamw_handout(p[i], m[i], v[i], g[i], s);
}

}  // namespace

AdamWFormula parse_formula(const std::string& formula) {
  if (formula == "handout") return AdamWFormula::kHandout;
  if (formula == "torch") return AdamWFormula::kTorch;
  TORCH_CHECK(false, "formula must be 'handout' or 'torch', got '", formula, "'");
}

void check_adamw_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& grad, const at::Tensor& segments, double lr, double beta1, double beta2,
                      double eps, double weight_decay) {
  check_float_buffer(param, "param", 1);
  check_float_buffer(exp_avg, "exp_avg", 1);
  check_float_buffer(exp_avg_sq, "exp_avg_sq", 1);
  check_float_buffer(grad, "grad", 1);
  check_same_device(exp_avg, "exp_avg", param, "param");
  check_same_device(exp_avg_sq, "exp_avg_sq", param, "param");
  check_same_device(grad, "grad", param, "param");
  const int64_t n = param.numel();
  TORCH_CHECK(exp_avg.numel() == n, "exp_avg must have ", n, " elements like param, got ", exp_avg.numel());
  TORCH_CHECK(exp_avg_sq.numel() == n, "exp_avg_sq must have ", n, " elements like param, got ", exp_avg_sq.numel());
  TORCH_CHECK(grad.numel() == n, "grad must have ", n, " elements like param, got ", grad.numel());
  TORCH_CHECK(segments.scalar_type() == at::kLong, "segments must be int64, got ", segments.scalar_type());
  TORCH_CHECK(segments.device().is_cpu(), "segments must be a CPU tensor (it is read by the host), got ",
              segments.device());
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 3, "segments must have shape [S, 3] (begin, end, step), got ",
              segments.sizes());
  TORCH_CHECK(segments.is_contiguous(), "segments must be contiguous");
  const int64_t* seg = segments.data_ptr<int64_t>();
  int64_t previous_end = 0;
  for (int64_t s = 0; s < segments.size(0); ++s) {
    const int64_t begin = seg[3 * s], end = seg[3 * s + 1], step = seg[3 * s + 2];
    TORCH_CHECK(begin >= previous_end && begin <= end && end <= n,
                "segments must be sorted, non-overlapping ranges within [0, ", n, "), got row ", s, " = [", begin,
                ", ", end, ") after a range ending at ", previous_end);
    TORCH_CHECK(step >= 1, "segments step must be >= 1, got ", step, " in row ", s);
    previous_end = end;
  }
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, "weight_decay must be finite and >= 0, got ",
              weight_decay);
}

void adamw_step_cpu(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& grad,
                    const at::Tensor& segments, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool correct_bias, c10::string_view formula_name) {
  const AdamWFormula formula = parse_formula(std::string(formula_name));
  check_adamw_args(param, exp_avg, exp_avg_sq, grad, segments, lr, beta1, beta2, eps, weight_decay);
  TORCH_CHECK(param.device().is_cpu(), "param must be a CPU tensor here, got ", param.device());
  const int64_t* seg = segments.data_ptr<int64_t>();
  const std::vector<AdamWScalars> scalars =
      segment_scalars(seg, segments.size(0), formula, lr, beta1, beta2, eps, weight_decay, correct_bias);
  const std::vector<Piece> pieces = cut_segment_rows(seg, segments.size(0), kAdamWPiece);
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  for_each_piece(static_cast<int64_t>(pieces.size()), param.numel(), [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q) {
      const Piece piece = pieces[q];
      if (formula == AdamWFormula::kTorch) {
        adamw_piece_torch(p, m, v, g, piece.begin, piece.end, scalars[piece.segment]);
      } else {
        adamw_piece_handout(p, m, v, g, piece.begin, piece.end, scalars[piece.segment]);
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def(
      "adamw_step(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, Tensor segments, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool correct_bias, str formula) -> ()");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
}

}  // namespace mtbert
