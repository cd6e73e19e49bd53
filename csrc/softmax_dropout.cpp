// softmax_dropout(scores: [B, H, Lq, Lk] float32 or bfloat16, mask_bias: [B, Lk] float32, scale, dropout_p,
//                 seed: [] int64) -> (out, probs: [B, H, Lq, Lk] of scores' dtype, keep: [B, H, Lq, Lk] uint8)
// softmax_dropout_backward(grad_out, probs, keep, scale, dropout_p) -> grad_scores (all of probs' dtype)
//
// The middle of attention with dropout, softmax(scores · scale + mask_bias) then dropout, in one pass
// over each row of scores (PyTorch's CPU attention with dropout runs it as five ops: scale, add the
// mask, softmax, draw a bernoulli mask, multiply). mask_bias holds one additive value per key of each
// sequence (0 to attend; Hugging Face's most negative finite float to skip, so that a row without
// any key softmaxes to uniform, not NaN). out = probs · keep / (1 - p); the mask comes from
// dropout_rng.h. Backward: dP = dout · keep / (1 - p), dS = scale · probs · (dP - Σ_j probs dP).
// bfloat16 scores (attention's first matmul under CPU autocast) are widened on load and every sum
// is float32; out, probs and grad_scores are rounded to bfloat16 once, at their store.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dropout_rng.h"
#include "flat_buffer.h"
#include "float_vectors.h"

namespace mtbert {

namespace {

// `e` [L]: float32 scratch for one row's exponentials (the bfloat16 probs cannot hold them unrounded).
template <typename T>
MTBERT_ALWAYS_INLINE void softmax_dropout_rows_of(const T* scores, const float* mask_bias, T* out, T* probs,
                                                  const uint8_t* keep, float* e, int64_t begin, int64_t end,
                                                  int64_t rows_per_sequence, int64_t L, float scale,
                                                  DropoutSettings s) {
  for (int64_t row = begin; row < end; ++row) {
    const T* s_r = scores + row * L;
    const float* bias = mask_bias + (row / rows_per_sequence) * L;
    T* p_r = probs + row * L;
    T* o_r = out + row * L;
    float high = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : high)
    for (int64_t c = 0; c < L; ++c) {
      e[c] = load_float(s_r, c) * scale + bias[c];
      high = std::max(high, e[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < L; ++c) e[c] = exp_nonpositive(e[c] - high);
    const float sum = lane_sum(L, [&](int64_t c) { return e[c]; });
    const float inverse = 1.0f / sum;
    if (s.active) {
      const uint8_t* keep_r = keep + row * L;
      const float kept = inverse * s.scale;
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) {
        store_float(o_r, c, e[c] * (static_cast<float>(keep_r[c]) * kept));
        store_float(p_r, c, e[c] * inverse);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) {
        store_float(o_r, c, e[c] * inverse);
        store_float(p_r, c, e[c] * inverse);
      }
    }
  }
}

// `d` [L]: float32 scratch for one row's dP.
template <typename T>
MTBERT_ALWAYS_INLINE void softmax_dropout_backward_rows_of(const T* grad_out, const T* probs, const uint8_t* keep,
                                                           T* grad_scores, float* d, int64_t begin, int64_t end,
                                                           int64_t L, float scale, DropoutSettings s) {
  for (int64_t row = begin; row < end; ++row) {
    const T* g = grad_out + row * L;
    const T* p = probs + row * L;
    T* ds = grad_scores + row * L;
    if (s.active) {
      const uint8_t* keep_r = keep + row * L;
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) d[c] = load_float(g, c) * (static_cast<float>(keep_r[c]) * s.scale);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) d[c] = load_float(g, c);
    }
    const float dot = lane_sum(L, [&](int64_t c) { return load_float(p, c) * d[c]; });
#pragma omp simd
    for (int64_t c = 0; c < L; ++c) store_float(ds, c, scale * load_float(p, c) * (d[c] - dot));
  }
}

// One multiversioned function per dtype (target_clones on the non-template functions).
MTBERT_VECTOR_CLONES
void softmax_dropout_rows(const float* scores, const float* mask_bias, float* out, float* probs, const uint8_t* keep,
                          float* e, int64_t begin, int64_t end, int64_t rows_per_sequence, int64_t L, float scale,
                          DropoutSettings s) {
  softmax_dropout_rows_of(scores, mask_bias, out, probs, keep, e, begin, end, rows_per_sequence, L, scale, s);
}

MTBERT_VECTOR_CLONES
void softmax_dropout_rows(const c10::BFloat16* scores, const float* mask_bias, c10::BFloat16* out,
                          c10::BFloat16* probs, const uint8_t* keep, float* e, int64_t begin, int64_t end,
                          int64_t rows_per_sequence, int64_t L, float scale, DropoutSettings s) {
  softmax_dropout_rows_of(scores, mask_bias, out, probs, keep, e, begin, end, rows_per_sequence, L, scale, s);
}

MTBERT_VECTOR_CLONES
void softmax_dropout_backward_rows(const float* grad_out, const float* probs, const uint8_t* keep, float* grad_scores,
                                   float* d, int64_t begin, int64_t end, int64_t L, float scale, DropoutSettings s) {
  softmax_dropout_backward_rows_of(grad_out, probs, keep, grad_scores, d, begin, end, L, scale, s);
}

MTBERT_VECTOR_CLONES
void softmax_dropout_backward_rows(const c10::BFloat16* grad_out, const c10::BFloat16* probs, const uint8_t* keep,
                                   c10::BFloat16* grad_scores, float* d, int64_t begin, int64_t end, int64_t L,
                                   float scale, DropoutSettings s) {
  softmax_dropout_backward_rows_of(grad_out, probs, keep, grad_scores, d, begin, end, L, scale, s);
}

void check_scores(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, " must be float32 or bfloat16, got ", dtype);
}

// Rows of scores handed to one thread at a time: a few kB of work each.
constexpr int64_t kRowGrain = 16;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_dropout_cpu(const at::Tensor& scores,
                                                                   const at::Tensor& mask_bias, double scale,
                                                                   double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(scores.dim() == 4 && scores.size(3) > 0,
              "scores must be 4-D [batch, heads, queries, keys] with keys > 0, got shape ", scores.sizes());
  check_dtype(scores.scalar_type(), "scores");
  check_scores(scores, "scores", scores.sizes(), scores.scalar_type());
  const int64_t B = scores.size(0), L = scores.size(3);
  check_scores(mask_bias, "mask_bias", {B, L}, at::kFloat);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  const DropoutSettings s = dropout_settings(dropout_p, seed);
  at::Tensor out = at::empty_like(scores), probs = at::empty_like(scores);
  at::Tensor keep = at::empty(s.active ? scores.sizes() : at::IntArrayRef({0}), scores.options().dtype(at::kByte));
  const int64_t rows = scores.numel() / L, rows_per_sequence = scores.size(1) * scores.size(2);
  const float* bias_p = mask_bias.data_ptr<float>();
  uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  if (s.active) fill_keep_mask(keep_p, scores.numel(), kAttentionStream, s);
  const auto run = [&](auto* s_p, auto* out_p, auto* probs_p) {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> e(L);
      softmax_dropout_rows(s_p, bias_p, out_p, probs_p, keep_p, e.data(), begin, end, rows_per_sequence, L,
                           static_cast<float>(scale), s);
    });
  };
  if (scores.scalar_type() == at::kBFloat16) {
    run(scores.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), probs.data_ptr<c10::BFloat16>());
  } else {
    run(scores.data_ptr<float>(), out.data_ptr<float>(), probs.data_ptr<float>());
  }
  return {out, probs, keep};
}

at::Tensor softmax_dropout_backward_cpu(const at::Tensor& grad_out, const at::Tensor& probs, const at::Tensor& keep,
                                        double scale, double dropout_p) {
  TORCH_CHECK(probs.dim() == 4 && probs.size(3) > 0,
              "probs must be 4-D [batch, heads, queries, keys] with keys > 0, got shape ", probs.sizes());
  check_dtype(probs.scalar_type(), "probs");
  check_scores(probs, "probs", probs.sizes(), probs.scalar_type());
  check_scores(grad_out, "grad_out", probs.sizes(), probs.scalar_type());
  // Only the scale and whether a mask applies are read here: the mask itself is `keep`.
  const DropoutSettings s = dropout_settings(dropout_p, at::zeros({}, at::kLong));
  if (s.active) check_scores(keep, "keep", probs.sizes(), at::kByte);
  const int64_t L = probs.size(3), rows = probs.numel() / L;
  at::Tensor grad_scores = at::empty_like(probs);
  const uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  const auto run = [&](const auto* g_p, const auto* p_p, auto* d_p) {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> d(L);
      softmax_dropout_backward_rows(g_p, p_p, keep_p, d_p, d.data(), begin, end, L, static_cast<float>(scale), s);
    });
  };
  if (probs.scalar_type() == at::kBFloat16) {
    run(grad_out.data_ptr<c10::BFloat16>(), probs.data_ptr<c10::BFloat16>(), grad_scores.data_ptr<c10::BFloat16>());
  } else {
    run(grad_out.data_ptr<float>(), probs.data_ptr<float>(), grad_scores.data_ptr<float>());
  }
  return grad_scores;
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("softmax_dropout(Tensor scores, Tensor mask_bias, float scale, float dropout_p, Tensor seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("softmax_dropout_backward(Tensor grad_out, Tensor probs, Tensor keep, float scale, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("softmax_dropout", &softmax_dropout_cpu);
  m.impl("softmax_dropout_backward", &softmax_dropout_backward_cpu);
}

}  // namespace mtbert
