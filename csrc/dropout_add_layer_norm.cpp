// dropout_add_layer_norm(x: [M, N] float32 or bfloat16, residual: [M, N] float32, weight, bias: [N] float32, eps,
//                        dropout_p, seed: [] int64) -> (y, z: [M, N] float32, mean, rstd: [M] float32, keep: [M, N] uint8)
// dropout_add_layer_norm_backward(grad_y, z, keep, weight, mean, rstd, dropout_p, row_bounds: int[K + 1] or [],
//                                 x_dtype=None)
//     -> (grad_x: [M, N] of x_dtype (float32 when None), grad_residual: [M, N], grad_weight, grad_bias: [K, N] float32)
//
// BERT's "dropout -> add -> LayerNorm" (after the attention output and the FFN) in one pass over each
// row: z = x * keep / (1 - p) + residual, y = (z - mean) * rstd * weight + bias. The keep mask is
// drawn first (dropout_rng.h, a byte per element) and returned as bytes for the backward; z (the LayerNorm input)
// is returned for the backward too, so x and residual need not be kept. The backward is the
// LayerNorm input gradient
//     dz = rstd * (g - mean(g) - ẑ * mean(g * ẑ)),   g = dy * weight,  ẑ = (z - mean) * rstd
// (d_residual = dz, dx = dz * keep / (1 - p)), and the weight and bias gradients dγ = Σ dy ẑ,
// dβ = Σ dy over the rows of each of the K row ranges [row_bounds[k], row_bounds[k + 1]) (one per
// task for the segmented multitask pass, see kernels/segmented.py; [] for a plain backward: one
// range, all rows, a constant that torch.compile can pass when the number of rows is symbolic).
// The sums are taken over fixed pieces of rows, then over the pieces in order: deterministic
// whatever the thread count.
//
// bfloat16 x is what CPU autocast hands over: a linear layer's output in bfloat16 beside the float32
// residual stream (autocast runs the add and LayerNorm in float32 by type promotion). The kernel
// widens x on load and computes everything in float32, so y and z are what the float32 kernel gives
// for the same (rounded) x; only grad_x is rounded to bfloat16, once, at its store.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <utility>
#include <vector>

#include "dropout_rng.h"
#include "flat_buffer.h"
#include "float_vectors.h"

namespace mtbert {

namespace {

constexpr uint32_t kLayerNormStream = 1;
// Rows per piece of the weight-gradient reduction.
constexpr int64_t kRowsPerPiece = 32;

template <typename X>
MTBERT_ALWAYS_INLINE void forward_rows_of(const X* x, const float* residual, const float* weight, const float* bias,
                                          float* y, float* z, float* mean, float* rstd, const uint8_t* keep,
                                          int64_t begin, int64_t end, int64_t N, float eps, DropoutSettings s) {
  for (int64_t row = begin; row < end; ++row) {
    const X* x_r = x + row * N;
    const float* res_r = residual + row * N;
    float* z_r = z + row * N;
    float* y_r = y + row * N;
    if (s.active) {
      const uint8_t* keep_r = keep + row * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) z_r[c] = load_float(x_r, c) * (static_cast<float>(keep_r[c]) * s.scale) + res_r[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) z_r[c] = load_float(x_r, c) + res_r[c];
    }
    const float mu = lane_sum(N, [&](int64_t c) { return z_r[c]; }) / static_cast<float>(N);
    const float squares = lane_sum(N, [&](int64_t c) { return (z_r[c] - mu) * (z_r[c] - mu); });
    const float r = 1.0f / std::sqrt(squares / static_cast<float>(N) + eps);
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) y_r[c] = (z_r[c] - mu) * r * weight[c] + bias[c];
    mean[row] = mu;
    rstd[row] = r;
  }
}

// One multiversioned function per dtype of x (target_clones on the non-template functions).
MTBERT_VECTOR_CLONES
void forward_rows(const float* x, const float* residual, const float* weight, const float* bias, float* y, float* z,
                  float* mean, float* rstd, const uint8_t* keep, int64_t begin, int64_t end, int64_t N, float eps,
                  DropoutSettings s) {
  forward_rows_of(x, residual, weight, bias, y, z, mean, rstd, keep, begin, end, N, eps, s);
}

MTBERT_VECTOR_CLONES
void forward_rows(const c10::BFloat16* x, const float* residual, const float* weight, const float* bias, float* y,
                  float* z, float* mean, float* rstd, const uint8_t* keep, int64_t begin, int64_t end, int64_t N,
                  float eps, DropoutSettings s) {
  forward_rows_of(x, residual, weight, bias, y, z, mean, rstd, keep, begin, end, N, eps, s);
}

// The rows [begin, end) of the backward; their dγ and dβ sums go to weight_sum and bias_sum [N].
// g = dy * weight is stored (in g, [N] scratch) before it is used: rounded once, so that g - mean(g) is
// exactly 0 where it should be (one feature), not the rounding error of a fused multiply-add times rstd.
template <typename X>
MTBERT_ALWAYS_INLINE void backward_rows_of(const float* grad_y, const float* z, const uint8_t* keep,
                                           const float* weight, const float* mean, const float* rstd, X* grad_x,
                                           float* grad_residual, float* weight_sum, float* bias_sum, float* g,
                                           int64_t begin, int64_t end, int64_t N, DropoutSettings s) {
  for (int64_t c = 0; c < N; ++c) weight_sum[c] = bias_sum[c] = 0.0f;
  for (int64_t row = begin; row < end; ++row) {
    const float* dy = grad_y + row * N;
    const float* z_r = z + row * N;
    const float mu = mean[row], r = rstd[row];
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) g[c] = dy[c] * weight[c];
    const float sum_g = lane_sum(N, [&](int64_t c) { return g[c]; });
    const float sum_g_hat = lane_sum(N, [&](int64_t c) { return g[c] * ((z_r[c] - mu) * r); });
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      weight_sum[c] += dy[c] * ((z_r[c] - mu) * r);
      bias_sum[c] += dy[c];
    }
    const float mean_g = sum_g / static_cast<float>(N), mean_g_hat = sum_g_hat / static_cast<float>(N);
    float* dres = grad_residual + row * N;
    X* dx = grad_x + row * N;
    if (s.active) {
      const uint8_t* keep_r = keep + row * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) {
        const float dz = r * (g[c] - mean_g - (z_r[c] - mu) * r * mean_g_hat);
        dres[c] = dz;
        store_float(dx, c, dz * (static_cast<float>(keep_r[c]) * s.scale));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) {
        const float dz = r * (g[c] - mean_g - (z_r[c] - mu) * r * mean_g_hat);
        dres[c] = dz;
        store_float(dx, c, dz);
      }
    }
  }
}

MTBERT_VECTOR_CLONES
void backward_rows(const float* grad_y, const float* z, const uint8_t* keep, const float* weight, const float* mean,
                   const float* rstd, float* grad_x, float* grad_residual, float* weight_sum, float* bias_sum, float* g,
                   int64_t begin, int64_t end, int64_t N, DropoutSettings s) {
  backward_rows_of(grad_y, z, keep, weight, mean, rstd, grad_x, grad_residual, weight_sum, bias_sum, g, begin, end, N, s);
}

MTBERT_VECTOR_CLONES
void backward_rows(const float* grad_y, const float* z, const uint8_t* keep, const float* weight, const float* mean,
                   const float* rstd, c10::BFloat16* grad_x, float* grad_residual, float* weight_sum, float* bias_sum,
                   float* g, int64_t begin, int64_t end, int64_t N, DropoutSettings s) {
  backward_rows_of(grad_y, z, keep, weight, mean, rstd, grad_x, grad_residual, weight_sum, bias_sum, g, begin, end, N, s);
}

void check_rows(const at::Tensor& t, const char* name, int64_t M, int64_t N, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, name, " must have shape [", M, ", ", N, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_x_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, " must be float32 or bfloat16, got ", dtype);
}

// The [M, N] rows both passes read (x and residual; z and grad_y) and the weight [N]; returns (M, N).
// `rows` may be float32 or bfloat16 when `rows_dtype` says so; `other` is float32.
std::pair<int64_t, int64_t> check_row_inputs(const at::Tensor& rows, const char* rows_name, at::ScalarType rows_dtype,
                                             const at::Tensor& other, const char* other_name,
                                             const at::Tensor& weight) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) > 0, rows_name,
              " must be 2-D [rows, features] with features > 0, got shape ", rows.sizes());
  const int64_t M = rows.size(0), N = rows.size(1);
  check_rows(rows, rows_name, M, N, rows_dtype);
  check_rows(other, other_name, M, N, at::kFloat);
  check_vector(weight, "weight", N);
  return {M, N};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double dropout_p, const at::Tensor& seed) {
  check_x_dtype(x.scalar_type(), "x");
  const std::pair<int64_t, int64_t> shape = check_row_inputs(x, "x", x.scalar_type(), residual, "residual", weight);
  const int64_t M = shape.first, N = shape.second;
  check_vector(bias, "bias", N);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "eps must be positive and finite, got ", eps);
  const DropoutSettings s = dropout_settings(dropout_p, seed);
  at::Tensor y = at::empty_like(residual), z = at::empty_like(residual);
  at::Tensor mean = at::empty({M}, residual.options()), rstd = at::empty({M}, residual.options());
  at::Tensor keep = at::empty({s.active ? M : 0, s.active ? N : 0}, x.options().dtype(at::kByte));
  uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  if (s.active) fill_keep_mask(keep_p, M * N, kLayerNormStream, s);
  const float* res_p = residual.data_ptr<float>();
  const float* w_p = weight.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  float *y_p = y.data_ptr<float>(), *z_p = z.data_ptr<float>();
  float *mean_p = mean.data_ptr<float>(), *rstd_p = rstd.data_ptr<float>();
  const auto run = [&](const auto* x_p) {
    at::parallel_for(0, M, kRowsPerPiece, [&](int64_t begin, int64_t end) {
      forward_rows(x_p, res_p, w_p, b_p, y_p, z_p, mean_p, rstd_p, keep_p, begin, end, N, static_cast<float>(eps), s);
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<c10::BFloat16>());
  } else {
    run(x.data_ptr<float>());
  }
  return {y, z, mean, rstd, keep};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& keep, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double dropout_p, c10::IntArrayRef row_bounds,
    std::optional<at::ScalarType> x_dtype) {
  const at::ScalarType grad_x_dtype = x_dtype.value_or(at::kFloat);
  check_x_dtype(grad_x_dtype, "x_dtype");
  const std::pair<int64_t, int64_t> shape = check_row_inputs(z, "z", at::kFloat, grad_y, "grad_y", weight);
  const int64_t M = shape.first, N = shape.second;
  check_vector(mean, "mean", M);
  check_vector(rstd, "rstd", M);
  // Only the scale and whether a mask applies are read here: the mask itself is `keep`.
  const DropoutSettings s = dropout_settings(dropout_p, at::zeros({}, at::kLong));
  if (s.active) check_rows(keep, "keep", M, N, at::kByte);
  const std::vector<int64_t> bounds = row_bounds.empty() ? std::vector<int64_t>{0, M} : row_bounds.vec();
  const int64_t K = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(K >= 1 && bounds[0] == 0 && bounds[K] == M,
              "row_bounds must rise from 0 to the number of rows ", M, " (or be empty), got ", row_bounds);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(bounds[k] <= bounds[k + 1], "row_bounds must rise from 0 to the number of rows ", M, ", got ",
                row_bounds);
  }
  const std::vector<Piece> pieces =
      cut_into_pieces(K, kRowsPerPiece, [&](int64_t k) { return std::make_pair(bounds[k], bounds[k + 1]); });
  const int64_t P = static_cast<int64_t>(pieces.size());
  at::Tensor grad_x = at::empty_like(z, z.options().dtype(grad_x_dtype)), grad_residual = at::empty_like(z);
  at::Tensor partial = at::empty({P, 2, N}, z.options());  // per piece: Σ dy ẑ, then Σ dy
  const float* dy_p = grad_y.data_ptr<float>();
  const float* z_p = z.data_ptr<float>();
  const uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  const float* w_p = weight.data_ptr<float>();
  const float *mean_p = mean.data_ptr<float>(), *rstd_p = rstd.data_ptr<float>();
  float* dres_p = grad_residual.data_ptr<float>();
  float* partial_p = partial.data_ptr<float>();
  const auto run = [&](auto* dx_p) {
    at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
      std::vector<float> g(N);
      for (int64_t q = first; q < last; ++q) {
        backward_rows(dy_p, z_p, keep_p, w_p, mean_p, rstd_p, dx_p, dres_p, partial_p + q * 2 * N,
                      partial_p + (q * 2 + 1) * N, g.data(), pieces[q].begin, pieces[q].end, N, s);
      }
    });
  };
  if (grad_x_dtype == at::kBFloat16) {
    run(grad_x.data_ptr<c10::BFloat16>());
  } else {
    run(grad_x.data_ptr<float>());
  }
  at::Tensor grad_weight = at::zeros({K, N}, z.options()), grad_bias = at::zeros({K, N}, z.options());
  float* sums_p[2] = {grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>()};
  for (int64_t q = 0; q < P; ++q) {  // in piece order: a fixed summation order
    for (int64_t part = 0; part < 2; ++part) {
      float* out = sums_p[part] + pieces[q].segment * N;
      const float* in = partial_p + (q * 2 + part) * N;
      for (int64_t c = 0; c < N; ++c) out[c] += in[c];
    }
  }
  return {grad_x, grad_residual, grad_weight, grad_bias};
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def(
      "dropout_add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, float dropout_p, "
      "Tensor seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dropout_add_layer_norm_backward(Tensor grad_y, Tensor z, Tensor keep, Tensor weight, Tensor mean, "
      "Tensor rstd, float dropout_p, int[] row_bounds, ScalarType? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_cpu);
  m.impl("dropout_add_layer_norm_backward", &dropout_add_layer_norm_backward_cpu);
}

}  // namespace mtbert
