// Checks the torch-free bsr_dense_mm core (bsr_dense_mm and bsr_linear, plain and with
// square_weight; bsr_linear also with the caller's transposed blocks) against a dense
// triple loop on odd shapes, rectangular and square blocks of 8-64, densities 1 to 0, for
// both ISA paths and both dtypes; and check_structure on broken metadata. Exit code 0 on success.
#include "bsr_dense_mm.h"
#include "../core_test.h"
#include "random_bsr.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using pxkern::bsr_dense_mm::Isa;
using pxkern::testing::Bsr;

struct Case {
  int64_t m, k, bm, bn, n;
  double density;
  bool bias;
};

template <typename T>
bool compare(const char* what, const Case& c, bool square, Isa isa, int threads,
             const std::vector<T>& out, const std::vector<double>& ref,
             const std::vector<double>& magnitude, double tol) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(out[i]) - ref[i]);
    if (!(err <= tol * (1.0 + magnitude[i]))) {
      std::printf(
          "FAIL %s%s %s isa=%s threads=%d m=%lld k=%lld block=%lldx%lld n=%lld density=%.2f "
          "bias=%d: "
          "flat index %zu got %.9g expected %.9g (abs err %.3g)\n",
          what, square ? " square_weight" : "", sizeof(T) == 4 ? "float32" : "float64",
          isa == Isa::kAvx2 ? "avx2" : "portable", threads, (long long)c.m, (long long)c.k,
          (long long)c.bm, (long long)c.bn, (long long)c.n, c.density, (int)c.bias, i,
          static_cast<double>(out[i]), ref[i], err);
      return false;
    }
  }
  return true;
}

template <typename T>
bool check_case(const Case& c, bool square, Isa isa, int threads, double tol, std::mt19937& rng) {
  const Bsr w = pxkern::testing::random_bsr(c.m, c.k, c.bm, c.bn, c.density, rng, sizeof(T) == 4);
  std::uniform_real_distribution<double> value(-1.0, 1.0);
  std::vector<double> x(c.k * c.n), xt(c.n * c.k), bias(c.bias ? c.m : 0);
  for (double& v : x) v = static_cast<T>(value(rng));
  for (double& v : bias) v = static_cast<T>(value(rng));
  for (int64_t q = 0; q < c.k; ++q)
    for (int64_t j = 0; j < c.n; ++j) xt[j * c.k + q] = x[q * c.n + j];

  // y = W x + bias[:, None] (W∘W if square) and its transpose, by definition in double.
  // magnitude: the sum of the terms' magnitudes, which bounds the rounding error of any
  // summation order (the kernels' tolerance is relative to it).
  std::vector<double> ref(c.m * c.n), ref_t(c.n * c.m);
  std::vector<double> magnitude(c.m * c.n), magnitude_t(c.n * c.m);
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) {
      double acc = c.bias ? bias[i] : 0.0, size = std::fabs(acc);
      for (int64_t q = 0; q < c.k; ++q) {
        const double wq = w.dense[i * c.k + q];
        const double term = (square ? wq * wq : wq) * x[q * c.n + j];
        acc += term;
        size += std::fabs(term);
      }
      ref[i * c.n + j] = ref_t[j * c.m + i] = acc;
      magnitude[i * c.n + j] = magnitude_t[j * c.m + i] = size;
    }

  const std::vector<T> values(w.values.begin(), w.values.end()), xv(x.begin(), x.end()),
      xtv(xt.begin(), xt.end()), bv(bias.begin(), bias.end());
  const T* bias_ptr = c.bias ? bv.data() : nullptr;
  std::vector<T> out(c.m * c.n, T(-12345)), out_t(c.n * c.m, T(-12345));
  pxkern::bsr_dense_mm::bsr_dense_mm<T>(values.data(), w.row_offsets.data(),
                                        w.column_indices.data(), c.m, c.k, c.bm, c.bn, xv.data(),
                                        c.n, bias_ptr, out.data(), square, isa, threads);
  pxkern::bsr_dense_mm::bsr_linear<T>(values.data(), w.row_offsets.data(),
                                      w.column_indices.data(), c.m, c.k, c.bm, c.bn, xtv.data(),
                                      c.n, bias_ptr, out_t.data(), square, isa, threads);
  // The same with the blocks transposed by the caller.
  std::vector<T> blocks(values.size()), out_kept(c.n * c.m, T(-12345));
  for (size_t p = 0; p < values.size() / (c.bm * c.bn); ++p)
    for (int64_t r = 0; r < c.bm; ++r)
      for (int64_t q = 0; q < c.bn; ++q)
        blocks[(p * c.bn + q) * c.bm + r] = values[(p * c.bm + r) * c.bn + q];
  pxkern::bsr_dense_mm::bsr_linear<T>(values.data(), w.row_offsets.data(),
                                      w.column_indices.data(), c.m, c.k, c.bm, c.bn, xtv.data(),
                                      c.n, bias_ptr, out_kept.data(), square, isa, threads,
                                      blocks.data());
  return compare("bsr_dense_mm", c, square, isa, threads, out, ref, magnitude, tol) &&
         compare("bsr_linear", c, square, isa, threads, out_t, ref_t, magnitude_t, tol) &&
         compare("bsr_linear (kept transposed blocks)", c, square, isa, threads, out_kept, ref_t,
                 magnitude_t, tol);
}

bool check_structure_messages() {
  using pxkern::bsr_dense_mm::check_structure;
  const int32_t good_offsets[] = {0, 1, 1, 3}, good_cols[] = {0, 1, 2};
  const int32_t bad_start[] = {1, 1, 1, 3}, decreasing[] = {0, 2, 1, 3}, bad_cols[] = {0, 3, 2};
  struct {
    const int32_t* offsets;
    const int32_t* cols;
    int64_t nnz;
    const char* expected;  // substring, or "" for valid
  } cases[] = {
      {good_offsets, good_cols, 3, ""},
      {bad_start, good_cols, 3, "row_offsets[0] must be 0"},
      {good_offsets, good_cols, 2, "must equal the number of blocks 2"},
      {decreasing, good_cols, 3, "non-decreasing"},
      {good_offsets, bad_cols, 3, "column_indices[1] = 3 is outside [0, 3)"},
  };
  bool ok = true;
  for (const auto& k : cases) {
    const std::string message = check_structure(k.offsets, k.cols, 3, 3, k.nnz);
    const bool pass = std::string(k.expected).empty() ? message.empty()
                                                      : message.find(k.expected) != std::string::npos;
    if (!pass) {
      std::printf("FAIL check_structure: expected \"%s\", got \"%s\"\n", k.expected,
                  message.c_str());
      ok = false;
    }
  }
  return ok;
}

}  // namespace

int main() {
  const Case cases[] = {
      // m, k, bm, bn, n, density, bias
      {96, 160, 16, 32, 37, 0.3, true},
      {96, 160, 16, 32, 37, 1.0, false},
      {96, 160, 32, 16, 37, 0.5, true},
      {64, 64, 8, 8, 1, 1.0, true},
      {64, 128, 8, 8, 29, 0.3, false},
      {128, 192, 64, 64, 70, 0.6, true},
      {128, 64, 64, 8, 13, 1.0, true},
      {40, 96, 8, 32, 100, 0.5, true},
      {64, 64, 16, 16, 24, 0.0, true},
      {64, 64, 16, 16, 24, 0.0, false},
      {256, 256, 32, 32, 64, 0.1, true},
      // Rows of 36 blocks: bsr_dense_mm sums them in 4 chunks (kChunkBytes), tiles after
      // the first starting from y.
      {64, 1152, 32, 32, 40, 1.0, true},
      // Enough blocks per block column for bsr_dense_mm to pack x (kMinPanelReuse), with a
      // partial last panel; the second needs a larger workspace than the first.
      {256, 64, 8, 16, 53, 0.9, true},
      {512, 96, 16, 8, 70, 1.0, false},
      {12, 20, 12, 4, 9, 1.0, true},  // blocks narrower than a vector
      // x over kStreamedXBytes (8.5 MB in float32): regions are cut into parts along N /
      // the batch and run part by part, bsr_dense_mm packing each part's panels.
      {32, 256, 8, 32, 8300, 1.0, true},
  };
  const std::vector<Isa> isas = pxkern::core_test::tested_isas();

  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  // Threads: the OpenMP default, one (a single range of regions), and three (more
  // ranges than this project's two cores, some of them empty on small cases, taken over
  // by the threads that finish first).
  for (const Case& c : cases)
    for (bool square : {false, true})
      for (Isa isa : isas)
        for (int threads : {0, 1, 3}) {
          failures += !check_case<float>(c, square, isa, threads, 2e-6, rng);
          failures += !check_case<double>(c, square, isa, threads, 1e-14, rng);
          checks += 2;
        }
  failures += !check_structure_messages();
  ++checks;
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
