// varlen_attention_cpu(qkv: [T, 3, heads, head_dim] float32, cu_seqlens: [B + 1] int32, max_seqlen, scale,
//                      dropout_p, seed: [] int64) -> (out: [T, heads, head_dim], probs: [heads · Σ_b L_b²],
//                                                     keep: uint8 of probs' size, or [0] without dropout)
// varlen_attention_cpu_backward(grad_out, qkv, probs, keep, cu_seqlens, max_seqlen, scale, dropout_p)
//     -> grad_qkv: [T, 3, heads, head_dim]
//
// Attention within each packed sequence, straight from the packed q, k, v: for each (sequence, head),
// S = q kᵀ · scale into that pair's block of `probs` (an [L, L] matrix product), the softmax and
// dropout row by row in place, out = (P ∘ Z / (1 - p)) v; each product is one batched BLAS call
// for the heads of a sequence that a thread holds. The CPU path before it padded q, k, v to
// [B, heads, max_len, head_dim] for batched matmuls and gathered the result back: zero-fills,
// index_put_, index and transposing copies on every layer, forward and backward. q, k, v are read
// in place from the fused projection `linear(x).view(T, 3, heads, head_dim)` (rows of head_dim
// floats stride(0) apart: BLAS leading dimensions), and their gradients written into one
// [T, 3, heads, head_dim] tensor, the projection's output gradient as it is (separate q, k, v
// would cost a stack of their gradients in unbind's backward).
//
// probs holds each (sequence b, head h) block [L_b, L_b] of softmax probabilities (before dropout)
// one after the other, b-major; keep the dropout mask of the same elements, drawn as the other
// ops' masks (dropout_rng.h), in softmax_dropout's stream: with equal lengths the blocks lie as
// softmax_dropout's [B, heads, L, L] scores, so both paths draw the same mask.
// Backward (Z the mask, s = 1 / (1 - p)):
//     dV = (P ∘ Z s)ᵀ dO,  dP = (dO Vᵀ) ∘ Z s,  dS = P ∘ (dP - Σ_j P dP),  dQ = scale dS K,  dK = scale dSᵀ Q.
// Every product is float32 BLAS (sgemm_batch of torch's MKL), every sum float32. Where torch's library
// exports no BLAS, plain loops stand in; MTBERT_CPU_ATTENTION_BLAS=0 forces them (read at each call:
// the tests run that path on every machine).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "dropout_rng.h"
#include "flat_buffer.h"
#include "float_vectors.h"

// BLAS's sgemm (column-major, 32-bit sizes), exported by torch's CPU library in its MKL builds. Weak,
// so the extension still loads against a torch without it; plain loops stand in then.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// Its batched form (MKL): group_count groups of group_size products of one shape, by pointer arrays.
extern "C" void sgemm_batch_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                             const float* alpha, const float** a, const int* lda, const float** b, const int* ldb,
                             const float* beta, float** c, const int* ldc, const int* group_count,
                             const int* group_size) __attribute__((weak));

namespace mtbert {

namespace {

// Whether this call's products go to BLAS: set at each op's entry (see the header comment).
std::atomic<bool> g_use_blas{true};

void choose_blas() {
  const char* setting = std::getenv("MTBERT_CPU_ATTENTION_BLAS");
  g_use_blas.store(sgemm_ != nullptr && sgemm_batch_ != nullptr && !(setting && std::strcmp(setting, "0") == 0),
                   std::memory_order_relaxed);
}

// Column-major C (m × n) = alpha · op(A) op(B), op transposing where asked; single-threaded (called
// inside the parallel loop: MKL runs sequentially inside an OpenMP parallel region).
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (g_use_blas.load(std::memory_order_relaxed)) {
    const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
    const int lda32 = static_cast<int>(lda), ldb32 = static_cast<int>(ldb), ldc32 = static_cast<int>(ldc);
    const float beta = 0.0f;
    sgemm_(transpose_a ? "T" : "N", transpose_b ? "T" : "N", &m32, &n32, &k32, &alpha, a, &lda32, b, &ldb32, &beta,
           c, &ldc32);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (int64_t l = 0; l < k; ++l) {
        sum += (transpose_a ? a[l + i * lda] : a[i + l * lda]) * (transpose_b ? b[j + l * ldb] : b[l + j * ldb]);
      }
      c[i + j * ldc] = alpha * sum;
    }
  }
}

// Row-major matrices of one sequence, one per head: head h's element (i, c) at
// data[(h - first_head) * head_step + i * ld + c].
struct HeadRows {
  float* data;
  int64_t ld, head_step, first_head;
  const float* head(int64_t h) const { return data + (h - first_head) * head_step; }
};

// The same column-major product for heads [h_begin, h_end): one batched call (sgemm's fixed cost,
// 1-2 µs, is paid once per sequence, not per head: a multitask batch of short
// sentences has thousands of (sequence, head) pairs a layer), else one call per head.
void gemm_heads(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, HeadRows a,
                HeadRows b, HeadRows c, int64_t h_begin, int64_t h_end) {
  thread_local std::vector<const float*> a_heads, b_heads;
  thread_local std::vector<float*> c_heads;
  a_heads.clear(), b_heads.clear(), c_heads.clear();
  for (int64_t h = h_begin; h < h_end; ++h) {
    a_heads.push_back(a.head(h));
    b_heads.push_back(b.head(h));
    c_heads.push_back(const_cast<float*>(c.head(h)));
  }
  if (!g_use_blas.load(std::memory_order_relaxed)) {
    for (size_t i = 0; i < a_heads.size(); ++i) {
      gemm(transpose_a, transpose_b, m, n, k, alpha, a_heads[i], a.ld, b_heads[i], b.ld, c_heads[i], c.ld);
    }
    return;
  }
  const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
  const int lda = static_cast<int>(a.ld), ldb = static_cast<int>(b.ld), ldc = static_cast<int>(c.ld);
  const int groups = 1, group_size = static_cast<int>(a_heads.size());
  const float beta = 0.0f;
  sgemm_batch_(transpose_a ? "T" : "N", transpose_b ? "T" : "N", &m32, &n32, &k32, &alpha, a_heads.data(), &lda,
               b_heads.data(), &ldb, &beta, c_heads.data(), &ldc, &groups, &group_size);
}

// C = alpha · A Bᵀ (a_rows × b_rows, inner n), alpha · A B or alpha · Aᵀ B, all row-major, for each
// head of [h_begin, h_end). BLAS is column-major: a row-major M is the column-major Mᵀ in the same
// memory, so C = op(A) op(B) is computed as Cᵀ = op(B)ᵀ op(A)ᵀ.
void matmul_transposed_b(HeadRows a, HeadRows b, HeadRows c, int64_t a_rows, int64_t b_rows, int64_t inner, float alpha,
                         int64_t h_begin, int64_t h_end) {
  gemm_heads(true, false, b_rows, a_rows, inner, alpha, b, a, c, h_begin, h_end);
}

void matmul(HeadRows a, HeadRows b, HeadRows c, int64_t a_rows, int64_t inner, int64_t b_cols, float alpha,
            int64_t h_begin, int64_t h_end) {
  gemm_heads(false, false, b_cols, a_rows, inner, alpha, b, a, c, h_begin, h_end);
}

// A: inner × a_cols, B: inner × b_cols.
void matmul_transposed_a(HeadRows a, HeadRows b, HeadRows c, int64_t a_cols, int64_t inner, int64_t b_cols,
                         float alpha, int64_t h_begin, int64_t h_end) {
  gemm_heads(false, true, b_cols, a_cols, inner, alpha, b, a, c, h_begin, h_end);
}

// `rows` rows of L (the [L, L] blocks of consecutive heads), in place: scores (already scaled) ->
// softmax probabilities; with dropout also `dropped` = probs · keep · s (what the second product reads).
MTBERT_VECTOR_CLONES
void softmax_dropout_blocks(float* probs, const uint8_t* keep, float* dropped, int64_t rows, int64_t L,
                            DropoutSettings s) {
  for (int64_t row = 0; row < rows; ++row) {
    float* p = probs + row * L;
    float high = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : high)
    for (int64_t c = 0; c < L; ++c) high = std::max(high, p[c]);
#pragma omp simd
    for (int64_t c = 0; c < L; ++c) p[c] = exp_nonpositive(p[c] - high);
    const float inverse = 1.0f / lane_sum(L, [&](int64_t c) { return p[c]; });
#pragma omp simd
    for (int64_t c = 0; c < L; ++c) p[c] *= inverse;
    if (s.active) {
      const uint8_t* z = keep + row * L;
      float* d = dropped + row * L;
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) d[c] = p[c] * (static_cast<float>(z[c]) * s.scale);
    }
  }
}

// `rows` rows of L: grad (dO Vᵀ on entry) -> dS = P ∘ (dP - Σ_j P dP) with dP = grad ∘ Z s; with
// dropout also `dropped` = P ∘ Z s for dV.
MTBERT_VECTOR_CLONES
void softmax_dropout_backward_blocks(const float* probs, const uint8_t* keep, float* grad, float* dropped,
                                     int64_t rows, int64_t L, DropoutSettings s) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* p = probs + row * L;
    float* g = grad + row * L;
    if (s.active) {
      const uint8_t* z = keep + row * L;
      float* d = dropped + row * L;
#pragma omp simd
      for (int64_t c = 0; c < L; ++c) {
        const float kept = static_cast<float>(z[c]) * s.scale;
        g[c] *= kept;
        d[c] = p[c] * kept;
      }
    }
    const float dot = lane_sum(L, [&](int64_t c) { return p[c] * g[c]; });
#pragma omp simd
    for (int64_t c = 0; c < L; ++c) g[c] = p[c] * (g[c] - dot);
  }
}

// The packed batch's sequences: starts, lengths and each one's first element in probs.
struct Sequences {
  std::vector<int64_t> start, length, block;  // block[b]: offset of (b, head 0); heads · Σ L² at the end
  int64_t heads;
};

Sequences sequences_of(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t max_seqlen, int64_t heads) {
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 2 && cu_seqlens.is_contiguous(),
              "cu_seqlens must be a contiguous 1-D int32 CPU tensor of B + 1 >= 2 offsets, got ",
              cu_seqlens.scalar_type(), " of shape ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  const int32_t* offsets = cu_seqlens.data_ptr<int32_t>();
  const int64_t B = cu_seqlens.numel() - 1;
  TORCH_CHECK(offsets[0] == 0 && offsets[B] == total_tokens, "cu_seqlens must start at 0 and end at T = ", total_tokens,
              ", got ", offsets[0], " and ", offsets[B]);
  Sequences seqs{{}, {}, {0}, heads};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t length = int64_t{offsets[b + 1]} - offsets[b];
    TORCH_CHECK(length >= 0, "cu_seqlens must be non-decreasing, got ", offsets[b], " before ", offsets[b + 1]);
    TORCH_CHECK(length <= max_seqlen, "max_seqlen (", max_seqlen, ") must be >= every length, got ", length);
    seqs.start.push_back(offsets[b]);
    seqs.length.push_back(length);
    seqs.block.push_back(seqs.block.back() + heads * length * length);
  }
  return seqs;
}

// Runs work(b, h_begin, h_end) over every (sequence, head) pair in parallel: one run of consecutive
// pairs per thread, the runs cut to equal work (L² per pair, plus a fixed cost for the calls; a
// packed batch of several tasks mixes short and long sequences, so equal counts of pairs would not
// balance), each run's pairs handed over a sequence at a time (the heads it holds of it).
template <typename Work>
void for_each_sequence_heads(const Sequences& seqs, const Work& work) {
  const int64_t B = static_cast<int64_t>(seqs.length.size()), heads = seqs.heads, pairs = B * heads;
  std::vector<int64_t> cost(pairs + 1, 0);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t L = seqs.length[i / heads];
    cost[i + 1] = cost[i] + L * L + 256;
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs));
  at::parallel_for(0, parts, 1, [&](int64_t first_part, int64_t last_part) {
    const int64_t begin = std::lower_bound(cost.begin(), cost.end(), cost[pairs] * first_part / parts) - cost.begin();
    const int64_t end = std::min<int64_t>(
        pairs, std::lower_bound(cost.begin(), cost.end(), cost[pairs] * last_part / parts) - cost.begin());
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / heads, h_end = std::min(end, (b + 1) * heads);
      if (seqs.length[b] > 0) work(b, i % heads, h_end - b * heads);
      i = h_end;
    }
  });
}

// q, k, v: the three [T, heads, head_dim] views of qkv.
std::array<at::Tensor, 3> unbind_qkv(const at::Tensor& qkv, const char* name) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.size(2) > 0 && qkv.size(3) > 0, name,
              " must be 4-D [T, 3, heads, head_dim] with heads, head_dim > 0, got shape ", qkv.sizes());
  TORCH_CHECK(qkv.device().is_cpu(), name, " must be a CPU tensor, got ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat, name, " must be float32, got ", qkv.scalar_type());
  return {qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2)};
}

// t: q of qkv, or grad_out (then of q's shape).
void check_packed(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == q.sizes(), name, " must have shape [T, heads, head_dim] = ", q.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) >= t.size(2) && t.stride(0) >= t.size(1) * t.stride(1),
              name, " must have unit stride over head_dim and non-overlapping heads and tokens, got strides ",
              t.strides(), " (of each of q, k, v for qkv)");
}

// The heads of one sequence's tokens from `start` in a [T, heads, head_dim] view.
HeadRows rows_of(const at::Tensor& t, int64_t start) {
  return {t.data_ptr<float>() + start * t.stride(0), t.stride(0), t.stride(1), 0};
}

// Per-thread scratch of at least n floats.
float* scratch(std::vector<float>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

void check_block_buffer(const at::Tensor& t, const char* name, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.numel() == numel &&
                  t.is_contiguous(),
              name, " must be a contiguous 1-D ", dtype, " CPU tensor of heads · Σ L² = ", numel,
              " elements, got ", t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens,
                                                                    int64_t max_seqlen, double scale,
                                                                    double dropout_p, const at::Tensor& seed) {
  const auto [q, k, v] = unbind_qkv(qkv, "qkv");
  check_packed(q, "qkv", q);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  choose_blas();
  const DropoutSettings s = dropout_settings(dropout_p, seed);
  const int64_t T = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const Sequences seqs = sequences_of(cu_seqlens, T, max_seqlen, heads);
  const int64_t numel = seqs.block.back();
  at::Tensor out = at::empty({T, heads, head_dim}, q.options());
  at::Tensor probs = at::empty({numel}, q.options());
  at::Tensor keep = at::empty({s.active ? numel : 0}, q.options().dtype(at::kByte));
  float* probs_p = probs.data_ptr<float>();
  const uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  if (s.active) fill_keep_mask(keep.data_ptr<uint8_t>(), numel, kAttentionStream, s);
  const float alpha = static_cast<float>(scale);
  for_each_sequence_heads(seqs, [&](int64_t b, int64_t h_begin, int64_t h_end) {
    thread_local std::vector<float> dropped_buffer;
    const int64_t L = seqs.length[b], start = seqs.start[b], offset = seqs.block[b] + h_begin * L * L;
    const int64_t rows = (h_end - h_begin) * L;
    const HeadRows p{probs_p + seqs.block[b], L, L * L, 0};
    float* dropped = s.active ? scratch(dropped_buffer, rows * L) : nullptr;
    matmul_transposed_b(rows_of(q, start), rows_of(k, start), p, L, L, head_dim, alpha, h_begin, h_end);
    softmax_dropout_blocks(probs_p + offset, s.active ? keep_p + offset : nullptr, dropped, rows, L, s);
    const HeadRows weights = s.active ? HeadRows{dropped, L, L * L, h_begin} : p;
    matmul(weights, rows_of(v, start), rows_of(out, start), L, L, head_dim, 1.0f, h_begin, h_end);
  });
  return {out, probs, keep};
}

at::Tensor varlen_attention_cpu_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& probs,
                                        const at::Tensor& keep, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                        double scale, double dropout_p) {
  const auto [q, k, v] = unbind_qkv(qkv, "qkv");
  check_packed(q, "qkv", q);
  check_packed(grad_out, "grad_out", q);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  choose_blas();
  // Only the scale and whether a mask applies are read here: the mask itself is `keep`.
  const DropoutSettings s = dropout_settings(dropout_p, at::zeros({}, at::kLong));
  const int64_t T = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const Sequences seqs = sequences_of(cu_seqlens, T, max_seqlen, heads);
  const int64_t numel = seqs.block.back();
  check_block_buffer(probs, "probs", numel, at::kFloat);
  if (s.active) check_block_buffer(keep, "keep", numel, at::kByte);
  at::Tensor grad_qkv = at::empty({T, 3, heads, head_dim}, q.options());
  const auto [grad_q, grad_k, grad_v] = unbind_qkv(grad_qkv, "grad_qkv");
  const float* probs_p = probs.data_ptr<float>();
  const uint8_t* keep_p = s.active ? keep.data_ptr<uint8_t>() : nullptr;
  const float alpha = static_cast<float>(scale);
  for_each_sequence_heads(seqs, [&](int64_t b, int64_t h_begin, int64_t h_end) {
    thread_local std::vector<float> grad_buffer, dropped_buffer;
    const int64_t L = seqs.length[b], start = seqs.start[b], offset = seqs.block[b] + h_begin * L * L;
    const int64_t rows = (h_end - h_begin) * L;
    const HeadRows p{const_cast<float*>(probs_p) + seqs.block[b], L, L * L, 0};
    const HeadRows grad{scratch(grad_buffer, rows * L), L, L * L, h_begin};
    float* dropped = s.active ? scratch(dropped_buffer, rows * L) : nullptr;
    const HeadRows grad_out_rows = rows_of(grad_out, start);
    matmul_transposed_b(grad_out_rows, rows_of(v, start), grad, L, L, head_dim, 1.0f, h_begin, h_end);  // dO Vᵀ
    softmax_dropout_backward_blocks(probs_p + offset, s.active ? keep_p + offset : nullptr, grad.data, dropped, rows,
                                    L, s);
    const HeadRows weights = s.active ? HeadRows{dropped, L, L * L, h_begin} : p;
    matmul_transposed_a(weights, grad_out_rows, rows_of(grad_v, start), L, L, head_dim, 1.0f, h_begin,
                        h_end);                                                                     // (P ∘ Z s)ᵀ dO
    matmul(grad, rows_of(k, start), rows_of(grad_q, start), L, L, head_dim, alpha, h_begin, h_end);  // dS K
    matmul_transposed_a(grad, rows_of(q, start), rows_of(grad_k, start), L, L, head_dim, alpha, h_begin,
                        h_end);  // dSᵀ Q
  });
  return grad_qkv;
}

TORCH_LIBRARY_FRAGMENT(mtbert, m) {
  m.def("varlen_attention_cpu(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, float scale, float dropout_p, "
        "Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def("varlen_attention_cpu_backward(Tensor grad_out, Tensor qkv, Tensor probs, Tensor keep, Tensor cu_seqlens, "
        "SymInt max_seqlen, float scale, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtbert, CPU, m) {
  m.impl("varlen_attention_cpu", &varlen_attention_cpu);
  m.impl("varlen_attention_cpu_backward", &varlen_attention_cpu_backward);
}

}  // namespace mtbert
