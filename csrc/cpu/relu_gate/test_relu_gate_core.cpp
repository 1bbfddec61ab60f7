// Checks the torch-free relu_gate core against a scalar reference: lengths around the
// vector width and the OpenMP chunk, ReLU and LeakyReLU, in place and not, both ISA paths
// and both dtypes; and that inf or NaN anywhere gives an infinite peak. Exit code 0 on
// success.
#include "relu_gate.h"
#include "../core_test.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using pxkern::relu_gate::Isa;

template <typename T>
bool check(int64_t n, T slope, bool inplace, Isa isa, std::mt19937& rng) {
  std::uniform_real_distribution<double> value(-2.0, 2.0);
  std::vector<T> x(n), y(n), gate(n, T(-7));
  for (T& v : x) v = static_cast<T>(value(rng));
  if (n > 3) x[n / 3] = T(0);
  const std::vector<T> original = x;
  T* out = inplace ? x.data() : y.data();
  const T peak = pxkern::relu_gate::relu_gate<T>(x.data(), n, slope, out, gate.data(), isa, 0);
  T expected_peak = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = original[i];
    const T want_y = v > 0 ? v : slope * v, want_gate = v > 0 ? T(1) : T(0);
    expected_peak = std::max(expected_peak, std::fabs(v));
    if (out[i] != want_y || gate[i] != want_gate) {
      std::printf("FAIL %s isa=%s n=%lld slope=%g inplace=%d: element %lld x=%g y=%g gate=%g\n",
                  sizeof(T) == 4 ? "float32" : "float64", isa == Isa::kAvx2 ? "avx2" : "portable",
                  (long long)n, (double)slope, (int)inplace, (long long)i, (double)v,
                  (double)out[i], (double)gate[i]);
      return false;
    }
  }
  if (peak != expected_peak) {
    std::printf("FAIL peak n=%lld: got %g expected %g\n", (long long)n, (double)peak,
                (double)expected_peak);
    return false;
  }
  return true;
}

template <typename T>
bool check_not_finite(int64_t n, int64_t at, T bad, Isa isa) {
  std::vector<T> x(n, T(0.5)), y(n), gate(n);
  x[at] = bad;
  const T peak = pxkern::relu_gate::relu_gate<T>(x.data(), n, T(0), y.data(), gate.data(), isa, 0);
  if (!std::isinf(peak)) {
    std::printf("FAIL %g at %lld of %lld gave peak %g, expected inf\n", (double)bad, (long long)at,
                (long long)n, (double)peak);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  const std::vector<Isa> isas = pxkern::core_test::tested_isas();
  const int64_t chunk = pxkern::relu_gate::kChunk;
  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  for (Isa isa : isas)
    for (int64_t n : pxkern::core_test::lengths_around(chunk))
      for (bool inplace : {false, true})
        for (double slope : {0.0, 0.1}) {
          failures += !check<float>(n, static_cast<float>(slope), inplace, isa, rng);
          failures += !check<double>(n, slope, inplace, isa, rng);
          checks += 2;
        }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (Isa isa : isas)
    for (int64_t at : {int64_t(0), int64_t(9), chunk + 2, 2 * chunk + 6}) {
      failures += !check_not_finite<float>(2 * chunk + 7, at, inf, isa);
      failures += !check_not_finite<float>(2 * chunk + 7, at, -inf, isa);
      failures += !check_not_finite<float>(2 * chunk + 7, at, nan, isa);
      failures += !check_not_finite<double>(2 * chunk + 7, at, static_cast<double>(nan), isa);
      checks += 4;
    }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
