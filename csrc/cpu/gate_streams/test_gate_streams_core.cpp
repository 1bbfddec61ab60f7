// Checks the torch-free gate_streams core against a scalar reference: lengths around the
// vector width and the OpenMP chunk, with and without the residual add and the ReLU, in
// place and not, both ISA paths and both dtypes; and that inf or NaN in either stream, in
// an input or a residual, gives infinite peaks. Exit code 0 on success.
#include "gate_streams.h"
#include "../core_test.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using pxkern::gate_streams::Arrays;
using pxkern::gate_streams::Isa;

template <typename T>
struct Case {
  std::vector<T> a, b, a_residual, b_residual, a_out, b_out;
  Arrays<T> arrays(bool residual, bool inplace, T scale) {
    T* ao = inplace ? a.data() : a_out.data();
    T* bo = inplace ? b.data() : b_out.data();
    return {a.data(), b.data(), residual ? a_residual.data() : nullptr,
            residual ? b_residual.data() : nullptr, scale, ao, bo};
  }
};

template <typename T>
Case<T> random_case(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<double> value(-2.0, 2.0);
  Case<T> c;
  for (auto* v : {&c.a, &c.b, &c.a_residual, &c.b_residual}) {
    v->resize(n);
    for (T& x : *v) x = static_cast<T>(value(rng));
  }
  if (n > 3) c.a[n / 3] = T(0);  // the gate of exactly 0 is closed
  c.a_out.assign(n, T(-7));
  c.b_out.assign(n, T(-7));
  return c;
}

template <typename T>
bool check(int64_t n, bool residual, bool relu, bool inplace, Isa isa, std::mt19937& rng) {
  Case<T> c = random_case<T>(n, rng);
  const Case<T> original = c;
  const T scale = T(0.25);
  const auto peaks = pxkern::gate_streams::gate_streams<T>(c.arrays(residual, inplace, scale), n,
                                                           relu, isa, 0);
  const T* a_out = inplace ? c.a.data() : c.a_out.data();
  const T* b_out = inplace ? c.b.data() : c.b_out.data();
  T peak_a = 0, peak_b = 0;
  for (int64_t i = 0; i < n; ++i) {
    T a = original.a[i], b = original.b[i];
    if (residual) {
      a += original.a_residual[i];
      b += scale * original.b_residual[i];
    }
    peak_a = std::max(peak_a, std::fabs(a));
    const bool open = !relu || a > T(0);
    const T want_a = open ? a : T(0), want_b = open ? b : T(0);
    peak_b = std::max(peak_b, std::fabs(want_b));
    if (a_out[i] != want_a || b_out[i] != want_b) {
      std::printf("FAIL %s isa=%s n=%lld residual=%d relu=%d inplace=%d: element %lld a=%g b=%g\n",
                  sizeof(T) == 4 ? "float32" : "float64", isa == Isa::kAvx2 ? "avx2" : "portable",
                  (long long)n, (int)residual, (int)relu, (int)inplace, (long long)i,
                  (double)a_out[i], (double)b_out[i]);
      return false;
    }
  }
  if (peaks.a != peak_a || peaks.b != peak_b) {
    std::printf("FAIL peaks n=%lld: got %g %g expected %g %g\n", (long long)n, (double)peaks.a,
                (double)peaks.b, (double)peak_a, (double)peak_b);
    return false;
  }
  return true;
}

// A value that is not finite at `at` of input `which` (0: a, 1: b, 2: a_residual,
// 3: b_residual), also where A's gate closes over it.
template <typename T>
bool check_not_finite(int64_t n, int64_t at, int which, T bad, Isa isa, std::mt19937& rng) {
  Case<T> c = random_case<T>(n, rng);
  std::vector<T>* inputs[] = {&c.a, &c.b, &c.a_residual, &c.b_residual};
  (*inputs[which])[at] = bad;
  const auto peaks = pxkern::gate_streams::gate_streams<T>(c.arrays(true, false, T(1)), n, true,
                                                           isa, 0);
  if (!std::isinf(peaks.a) || !std::isinf(peaks.b)) {
    std::printf("FAIL %g at %lld of input %d gave peaks %g %g, expected inf\n", (double)bad,
                (long long)at, which, (double)peaks.a, (double)peaks.b);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  const std::vector<Isa> isas = pxkern::core_test::tested_isas();
  const int64_t chunk = pxkern::gate_streams::kChunk;
  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  for (Isa isa : isas)
    for (int64_t n : pxkern::core_test::lengths_around(chunk))
      for (bool residual : {false, true})
        for (bool relu : {false, true})
          for (bool inplace : {false, true}) {
            failures += !check<float>(n, residual, relu, inplace, isa, rng);
            failures += !check<double>(n, residual, relu, inplace, isa, rng);
            checks += 2;
          }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (Isa isa : isas)
    for (int64_t at : {int64_t(0), int64_t(9), chunk + 2, 2 * chunk + 6})
      for (int which = 0; which < 4; ++which) {
        failures += !check_not_finite<float>(2 * chunk + 7, at, which, inf, isa, rng);
        failures += !check_not_finite<float>(2 * chunk + 7, at, which, -inf, isa, rng);
        failures += !check_not_finite<float>(2 * chunk + 7, at, which, nan, isa, rng);
        failures += !check_not_finite<double>(2 * chunk + 7, at, which, static_cast<double>(nan),
                                              isa, rng);
        checks += 4;
      }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
