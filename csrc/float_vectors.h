// Eight-lane float32 / float64 vectors for the gradient-surgery kernels (gradient_gram.cpp,
// gradient_combine.cpp), written with the GCC / Clang vector extensions: each MTBERT_VECTOR_CLONES
// clone lowers the same source to its own registers (one zmm, two ymm or four xmm per vector); and
// the float32 / bfloat16 element access of the fused dropout kernels and the exp of their softmaxes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define MTBERT_ALWAYS_INLINE inline __attribute__((always_inline))

namespace mtbert {

// The vectors only live in registers of always-inlined code, never cross a call, so the ABI of
// passing them by value (which GCC warns about where AVX-512 is not enabled) never applies. Only
// the kernel files include this header.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float Floats8 __attribute__((vector_size(32)));
typedef double Doubles8 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 8;

// Eight consecutive float32 (any alignment), widened to float64.
MTBERT_ALWAYS_INLINE Doubles8 load_as_double(const float* p) {
  Floats8 f;
  std::memcpy(&f, p, sizeof f);
  return __builtin_convertvector(f, Doubles8);
}

MTBERT_ALWAYS_INLINE void store_as_float(float* p, const Doubles8& v) {
  const Floats8 f = __builtin_convertvector(v, Floats8);
  std::memcpy(p, &f, sizeof f);
}

// Non-temporal stores (p 16-byte aligned) where the platform has them: they write around the caches
// and skip reading each output line before overwriting it. Follow the last one with
// streaming_stores_done() before the output is read.
MTBERT_ALWAYS_INLINE void stream_as_float(float* p, const Doubles8& v) {
  const Floats8 f = __builtin_convertvector(v, Floats8);
#if defined(__SSE__)
  __m128 half[2];
  std::memcpy(half, &f, sizeof f);
  _mm_stream_ps(p, half[0]);
  _mm_stream_ps(p + 4, half[1]);
#else
  std::memcpy(p, &f, sizeof f);
#endif
}

// Σ term(i) for i in [0, n) over 16 fixed lanes (lane i % 16), then the lanes in a fixed order: a
// vectorized sum whose rounding does not depend on where the data lies. (GCC peels the first
// iterations of an `omp simd reduction` loop to align its loads, so two equal rows in two buffers
// could sum differently, and e.g. SBERT's |u - v| of two equal sentences would not be exactly 0.)
template <typename Term>
MTBERT_ALWAYS_INLINE float lane_sum(int64_t n, const Term& term) {
  constexpr int64_t kSumLanes = 16;
  float lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kSumLanes; ++l) lanes[l] += term(i + l);
  }
  for (int64_t l = 0; i + l < n; ++l) lanes[l] += term(i + l);
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Element loads and stores of the kernels that take float32 or bfloat16 rows (dropout_add_layer_norm,
// softmax_dropout): arithmetic is float32 either way; a bfloat16 value widens exactly (its bits are
// a float32's upper half) and a float32 result narrows once, at the store, rounding to nearest even
// (with NaN kept NaN), as torch's own conversion does. Plain shifts and masks, so loops over them
// vectorize.
MTBERT_ALWAYS_INLINE float load_float(const float* p, int64_t i) { return p[i]; }

MTBERT_ALWAYS_INLINE float load_float(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

MTBERT_ALWAYS_INLINE void store_float(float* p, int64_t i, float v) { p[i] = v; }

MTBERT_ALWAYS_INLINE void store_float(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i].x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);  // v != v: NaN
}

// exp(x) for the x <= 0 of a softmax (scores minus their maximum), in a form GCC vectorizes (std::exp
// does not vectorize without -ffast-math): Cephes' expf, x = n ln 2 + r with |r| <= ln 2 / 2 and a
// degree-6 polynomial in r, within 2 ulp of exp. Below the smallest normal float's logarithm the
// result is 0, as a masked key's (mask_bias = the most negative float) must be.
MTBERT_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float clamped = std::max(x, -87.0f);
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = clamped - n * kLn2High - n * kLn2Low;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return x < -87.0f ? 0.0f : p * two_to_n;
}

inline void streaming_stores_done() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

}  // namespace mtbert
