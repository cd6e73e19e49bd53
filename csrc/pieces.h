// The cutting of a flat buffer's segments into pieces of parallel work, shared by the CPU ops and
// the CUDA bindings. No torch headers: the CUDA launchers (compiled by nvcc alone) use Piece too.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace mtbert {

// A contiguous piece of one segment: the unit of parallel work. Cutting every segment into pieces of
// at most `piece` columns keeps threads busy on one huge segment (word embeddings) and many tiny ones
// (biases) alike, and a fixed cut keeps float reductions deterministic whatever the thread count.
struct Piece {
  int64_t begin, end, segment;
};

// Segments s in [0, count) span the columns range(s) = {begin, end}; pieces come in segment order.
template <typename Range>
std::vector<Piece> cut_into_pieces(int64_t count, int64_t piece, const Range& range) {
  std::vector<Piece> pieces;
  for (int64_t s = 0; s < count; ++s) {
    const std::pair<int64_t, int64_t> columns = range(s);
    for (int64_t b = columns.first; b < columns.second; b += piece) {
      pieces.push_back({b, std::min(b + piece, columns.second), s});
    }
  }
  return pieces;
}

// The rows (begin, end, step) of an adamw_step `segments` table [count, 3].
inline std::vector<Piece> cut_segment_rows(const int64_t* rows, int64_t count, int64_t piece) {
  return cut_into_pieces(count, piece, [rows](int64_t s) { return std::make_pair(rows[3 * s], rows[3 * s + 1]); });
}

}  // namespace mtbert
