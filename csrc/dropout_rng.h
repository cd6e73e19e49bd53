// Dropout's keep mask from a counter-based generator (Philox4x32-10, Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and of torch's CUDA dropout). Each
// word is a pure function of (seed, stream, position), so the mask is drawn in any order on any
// thread and is reproducible from the seed. The seed comes from torch's generator (see
// mtbert/kernels/_dropout_seed.py), so torch.manual_seed fixes the masks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "flat_buffer.h"

namespace mtbert {

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

// The mask of a tensor is drawn in chunks of kChunk consecutive elements (of its flattened storage):
// chunk c takes kBlocks Philox blocks with counters (b, c_lo, c_hi, stream), and its element i reads
// word i / kBlocks of block i % kBlocks, so each word fills a contiguous quarter of the chunk and the
// loop over blocks vectorizes, one lane per block, whatever the rows' lengths (rows of 51 attention
// probabilities take 13 blocks: too few lanes). An element's bit depends only on (seed, stream, its
// index), not on how rows are split between threads.
constexpr int64_t kBlocks = 1024, kChunk = 4 * kBlocks;

// The stream of attention's masks, shared by softmax_dropout (over padded [B, heads, L, L] scores) and
// varlen_attention_cpu (over each packed (sequence, head)'s [L, L] block, b-major): a batch of equal
// lengths gets the same mask on the padded and the unpadded path.
constexpr uint32_t kAttentionStream = 2;

// keep[e] for every element e of a tensor of `numel` elements (keep: numel bytes), chunks in parallel.
// `stream` tells the ops apart: the same seed in two ops draws different masks.
void fill_keep_mask(uint8_t* keep, int64_t numel, uint32_t stream, const DropoutSettings& s);

}  // namespace mtbert
