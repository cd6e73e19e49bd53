// The keep masks of the dropout ops (see dropout_rng.h).
#include "dropout_rng.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "float_vectors.h"

namespace mtbert {

namespace {

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

// Chunks [first, last) of the mask: each chunk's kBlocks blocks in one vectorized loop, then the
// chunk's words compared with the threshold.
MTBERT_VECTOR_CLONES
void fill_chunks(uint8_t* keep, int64_t numel, int64_t first, int64_t last, uint32_t stream, DropoutSettings s) {
  uint32_t words[4][kBlocks];
  for (int64_t chunk = first; chunk < last; ++chunk) {
    const uint32_t chunk_lo = static_cast<uint32_t>(chunk);
    const uint32_t chunk_hi = static_cast<uint32_t>(static_cast<uint64_t>(chunk) >> 32);
#pragma omp simd
    for (int64_t b = 0; b < kBlocks; ++b) {
      philox4x32_10(static_cast<uint32_t>(b), chunk_lo, chunk_hi, stream, s.seed_lo, s.seed_hi, &words[0][b],
                    &words[1][b], &words[2][b], &words[3][b]);
    }
    const int64_t size = std::min(kChunk, numel - chunk * kChunk);
    const uint32_t* word = &words[0][0];  // the four rows of words are contiguous: word[i] is element i's
    uint8_t* out = keep + chunk * kChunk;
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) out[i] = word[i] < s.keep_below;
  }
}

}  // namespace

void fill_keep_mask(uint8_t* keep, int64_t numel, uint32_t stream, const DropoutSettings& s) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) { fill_chunks(keep, numel, first, last, stream, s); });
}

}  // namespace mtbert
