// Dropout's keep mask from a counter-based generator (Philox4x32-10, Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and of torch's CUDA dropout). Each
// output word is a pure function of (seed, row, column), so rows are generated in any order on any
// thread and the mask is reproducible from the seed. The seed comes from torch's generator (see
// mtbert/kernels/dropout.py), so torch.manual_seed fixes the masks.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "flat_buffer.h"
#include "float_vectors.h"

namespace mtbert {

// One Philox4x32 block: four 32-bit words from the counter (c0, c1, c2, c3) and the key (k0, k1).
MTBERT_ALWAYS_INLINE void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                        uint32_t* out0, uint32_t* out1, uint32_t* out2, uint32_t* out3) {
  constexpr uint64_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = kMul0 * c0, p1 = kMul1 * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  *out0 = c0;
  *out1 = c1;
  *out2 = c2;
  *out3 = c3;
}

// What a dropout op needs: keep an element when its word is below keep_below = (1 - p) * 2^32, and
// scale kept elements by 1 / (1 - p) (as torch's dropout: x * (mask / (1 - p))).
struct DropoutSettings {
  uint32_t seed_lo, seed_hi, keep_below;
  float scale;
  bool active;  // p > 0
};

inline DropoutSettings dropout_settings(double p, const at::Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " of shape ", seed.sizes(),
              " on ", seed.device());
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const double keep = std::ldexp(1.0 - p, 32);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
          keep >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(keep), static_cast<float>(1.0 / (1.0 - p)),
          p > 0.0};
}

// Words per Philox call: a row of n elements takes ceil(n / 4) blocks, element e reads word e / blocks
// of block e % blocks, so each of the four words fills a contiguous quarter of the row (the loop over
// blocks vectorizes, one lane per block).
constexpr int64_t kMaxRowBlocks = 1024;

// keep[0, n) of row `row` (stream tells the ops apart: the same seed in two ops draws different masks).
// Inlined into each op's multiversioned row loop, so it is compiled for that loop's vector width.
MTBERT_ALWAYS_INLINE void keep_mask_row(uint8_t* keep, int64_t n, int64_t row, uint32_t stream, const DropoutSettings& s) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t first = 0; first < blocks; first += kMaxRowBlocks) {
    const int64_t count = std::min(kMaxRowBlocks, blocks - first);
    uint32_t words[4][kMaxRowBlocks];
    const uint32_t row_lo = static_cast<uint32_t>(row), row_hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
#pragma omp simd
    for (int64_t b = 0; b < count; ++b) {
      philox4x32_10(static_cast<uint32_t>(first + b), row_lo, row_hi, stream, s.seed_lo, s.seed_hi, &words[0][b],
                    &words[1][b], &words[2][b], &words[3][b]);
    }
    for (int w = 0; w < 4; ++w) {
      const int64_t begin = w * blocks + first, end = std::min(begin + count, n);
      for (int64_t e = begin; e < end; ++e) keep[e] = words[w][e - begin] < s.keep_below;
    }
  }
}

}  // namespace mtbert
