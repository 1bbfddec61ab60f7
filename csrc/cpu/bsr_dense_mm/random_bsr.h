// Random block-sparse matrices for the standalone core tests of the BSR ops
// (test_bsr_dense_mm_core.cpp, ../bsr_px_scores/test_bsr_px_scores_core.cpp).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace pxkern {
namespace testing {

// W [m, k] in BSR form with bm x bn blocks, plus its dense copy.
struct Bsr {
  std::vector<double> values, dense;
  std::vector<int32_t> row_offsets, column_indices;
};

// Keeps each block with probability density, values uniform in [-1, 1) (rounded to float
// if round_to_float, so that float32 kernels see the same W as the double reference).
inline Bsr random_bsr(int64_t m, int64_t k, int64_t bm, int64_t bn, double density,
                      std::mt19937& rng, bool round_to_float) {
  std::uniform_real_distribution<double> value(-1.0, 1.0);
  std::bernoulli_distribution keep(density);
  Bsr w;
  w.dense.assign(m * k, 0.0);
  w.row_offsets.push_back(0);
  for (int64_t i = 0; i < m / bm; ++i) {
    for (int64_t j = 0; j < k / bn; ++j) {
      if (!keep(rng)) continue;
      w.column_indices.push_back(static_cast<int32_t>(j));
      for (int64_t r = 0; r < bm; ++r)
        for (int64_t q = 0; q < bn; ++q) {
          double v = value(rng);
          if (round_to_float) v = static_cast<float>(v);
          w.values.push_back(v);
          w.dense[(i * bm + r) * k + j * bn + q] = v;
        }
    }
    w.row_offsets.push_back(static_cast<int32_t>(w.column_indices.size()));
  }
  return w;
}

}  // namespace testing
}  // namespace pxkern
