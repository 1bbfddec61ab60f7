// Checks the torch-free keep_top core against a sort: the keys order like the values and
// give them back; the k-th smallest over several parts for every k of small inputs and
// sampled k of large ones (below, at and above the size at which the radix select
// gathers), with duplicates, zeros of both signs, negatives and infinities, in float32
// and float64; and the kept masks with and without old masks and ties. Exit code 0 on
// success.
#include "keep_top.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

namespace {

using pxkern::keep_top::Part;

template <typename T>
std::vector<T> sample(int64_t n, int kind, std::mt19937& rng) {
  std::uniform_int_distribution<int> small(0, 6), exponent(-30, 30);
  std::normal_distribution<double> normal;
  std::vector<T> values(n);
  for (T& v : values) {
    if (kind == 0) v = static_cast<T>(small(rng)) / T(4);  // ties
    if (kind == 1) v = static_cast<T>(normal(rng) * std::pow(10.0, exponent(rng)));
    if (kind == 2) v = T(0);
  }
  if (kind == 1 && n > 4) {
    values[0] = std::numeric_limits<T>::infinity();
    values[1] = -std::numeric_limits<T>::infinity();
    values[2] = T(-0.0);
    values[3] = T(0.0);
  }
  return values;
}

template <typename T>
bool check_keys(std::mt19937& rng) {
  std::vector<T> values = sample<T>(4000, 1, rng);
  std::sort(values.begin(), values.end());
  for (size_t i = 0; i + 1 < values.size(); ++i) {
    const auto a = pxkern::keep_top::key_of(values[i]), b = pxkern::keep_top::key_of(values[i + 1]);
    const bool ordered = values[i] < values[i + 1] ? a < b : a <= b || values[i] == values[i + 1];
    if (!ordered || pxkern::keep_top::value_of<T>(a) != values[i]) {
      std::printf("FAIL keys of %g and %g\n", (double)values[i], (double)values[i + 1]);
      return false;
    }
  }
  return true;
}

// Three parts of sizes n/2, n/3 and the rest.
template <typename T>
bool check_kth(int64_t n, int kind, std::mt19937& rng) {
  const std::vector<T> values = sample<T>(n, kind, rng);
  const int64_t a = n / 2, b = n / 3;
  const std::vector<Part<T>> parts{{values.data(), nullptr, a}, {values.data() + a, nullptr, b},
                                   {values.data() + a + b, nullptr, n - a - b}};
  std::vector<T> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  const int64_t step = std::max<int64_t>(1, n / 97);
  for (int64_t k = 1; k <= n; k += step) {
    const T got = pxkern::keep_top::kth_smallest(parts, k);
    if (got != sorted[k - 1]) {
      std::printf("FAIL %s kind %d n=%lld k=%lld: got %g expected %g\n", sizeof(T) == 4 ? "float32" : "float64",
                  kind, (long long)n, (long long)k, (double)got, (double)sorted[k - 1]);
      return false;
    }
  }
  return true;
}

template <typename T>
bool check_keep(int64_t n, double density, bool ties, bool with_mask, std::mt19937& rng) {
  const std::vector<T> values = sample<T>(n, 0, rng);
  std::vector<char> old(n);
  for (char& m : old) m = rng() % 5 != 0;
  const bool* mask = with_mask ? reinterpret_cast<const bool*>(old.data()) : nullptr;
  const std::vector<Part<T>> parts{{values.data(), mask, n}};
  std::vector<char> kept(n, 2);
  const T threshold = pxkern::keep_top::threshold_for(parts, density);
  const int64_t count =
      pxkern::keep_top::keep_above(parts, threshold, ties, {reinterpret_cast<bool*>(kept.data())});
  std::vector<T> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  const int64_t k = static_cast<int64_t>((1.0 - density) * static_cast<double>(n));
  const T expected_threshold = k == 0 ? -std::numeric_limits<T>::infinity() : sorted[k - 1];
  int64_t expected_count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T s = values[i];
    const bool want = (s > expected_threshold || (ties && expected_threshold > 0 && s == expected_threshold)) &&
                      (!with_mask || old[i]);
    expected_count += want;
    if (kept[i] != want) {
      std::printf("FAIL keep n=%lld density=%g ties=%d mask=%d at %lld\n", (long long)n, density, (int)ties,
                  (int)with_mask, (long long)i);
      return false;
    }
  }
  if (threshold != expected_threshold || count != expected_count) {
    std::printf("FAIL keep n=%lld: threshold %g count %lld, expected %g %lld\n", (long long)n, (double)threshold,
                (long long)count, (double)expected_threshold, (long long)expected_count);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  failures += !check_keys<float>(rng);
  failures += !check_keys<double>(rng);
  checks += 2;
  for (int64_t n : {1, 2, 7, 100, 4095, 4097, 20000, 300000})
    for (int kind : {0, 1, 2}) {
      failures += !check_kth<float>(n, kind, rng);
      failures += !check_kth<double>(n, kind, rng);
      checks += 2;
    }
  for (int64_t n : {1, 10, 5000})
    for (double density : {1.0, 0.5, 0.1, 1e-9})
      for (bool ties : {false, true})
        for (bool with_mask : {false, true}) {
          failures += !check_keep<float>(n, density, ties, with_mask, rng);
          ++checks;
        }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
