// Checks the torch-free bsr_px_scores core against |g^T x| * W^2 computed densely in double
// on odd shapes, square and rectangular blocks of 4-64, densities 1 to 0, batches of 0 to
// several batch chunks, for both ISA paths and both dtypes. Exit code 0 on success.
#include "bsr_px_scores.h"
#include "../core_test.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../bsr_dense_mm/random_bsr.h"

namespace {

using pxkern::bsr_px_scores::Isa;

struct Case {
  int64_t m, k, bm, bn, batch;
  double density;
};

template <typename T>
bool check_case(const Case& c, Isa isa, double tol, std::mt19937& rng) {
  const pxkern::testing::Bsr w =
      pxkern::testing::random_bsr(c.m, c.k, c.bm, c.bn, c.density, rng, sizeof(T) == 4);
  std::uniform_real_distribution<double> value(-1.0, 1.0);
  std::vector<double> g(c.batch * c.m), x(c.batch * c.k);
  for (double& v : g) v = static_cast<T>(value(rng));
  for (double& v : x) v = static_cast<T>(value(rng));

  // Reference in the values layout: block p of block row i, column j, by definition.
  std::vector<double> ref(w.values.size());
  for (int64_t i = 0; i < c.m / c.bm; ++i)
    for (int32_t p = w.row_offsets[i]; p < w.row_offsets[i + 1]; ++p)
      for (int64_t r = 0; r < c.bm; ++r)
        for (int64_t q = 0; q < c.bn; ++q) {
          const int64_t row = i * c.bm + r, col = w.column_indices[p] * c.bn + q;
          double acc = 0.0;
          for (int64_t b = 0; b < c.batch; ++b) acc += g[b * c.m + row] * x[b * c.k + col];
          const double wv = w.values[(p * c.bm + r) * c.bn + q];
          ref[(p * c.bm + r) * c.bn + q] = std::fabs(acc) * wv * wv;
        }

  const std::vector<T> values(w.values.begin(), w.values.end()), gv(g.begin(), g.end()),
      xv(x.begin(), x.end());
  std::vector<T> out(ref.size(), T(-12345));
  pxkern::bsr_px_scores::bsr_px_scores<T>(values.data(), w.row_offsets.data(),
                                          w.column_indices.data(), c.m, c.k, c.bm, c.bn,
                                          gv.data(), xv.data(), c.batch, out.data(), isa, 0);
  // Sums of up to `batch` products of magnitude <= 1.
  const double scale = 1.0 + static_cast<double>(c.batch);
  for (size_t e = 0; e < ref.size(); ++e) {
    const double err = std::fabs(static_cast<double>(out[e]) - ref[e]);
    if (!(err <= tol * scale)) {
      std::printf(
          "FAIL bsr_px_scores %s isa=%s m=%lld k=%lld block=%lldx%lld batch=%lld "
          "density=%.2f: flat index %zu got %.9g expected %.9g (abs err %.3g)\n",
          sizeof(T) == 4 ? "float32" : "float64", isa == Isa::kAvx2 ? "avx2" : "portable",
          (long long)c.m, (long long)c.k, (long long)c.bm, (long long)c.bn, (long long)c.batch,
          c.density, e, static_cast<double>(out[e]), ref[e], err);
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  const Case cases[] = {
      // m, k, bm, bn, batch, density
      {96, 160, 16, 32, 5, 0.3},
      {96, 160, 32, 16, 1, 1.0},
      {64, 64, 8, 8, 1, 1.0},
      {64, 128, 8, 8, 37, 0.3},
      {128, 192, 64, 64, 7, 0.6},
      {128, 64, 64, 8, 3, 1.0},
      {40, 96, 8, 32, 300, 0.5},   // several batch chunks
      {64, 96, 32, 32, 250, 1.0},  // several batch chunks
      {64, 64, 16, 16, 5, 0.0},
      {64, 64, 16, 16, 0, 1.0},    // empty batch: zero scores
      {12, 20, 12, 4, 9, 1.0},     // blocks narrower than a vector
      {36, 40, 12, 20, 6, 0.7},    // partial last vector
  };
  const std::vector<Isa> isas = pxkern::core_test::tested_isas();

  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  for (const Case& c : cases)
    for (Isa isa : isas) {
      failures += !check_case<float>(c, isa, 1e-6, rng);
      failures += !check_case<double>(c, isa, 1e-14, rng);
      checks += 2;
    }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
