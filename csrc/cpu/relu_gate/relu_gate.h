// ReLU / LeakyReLU with its gate and the input's peak magnitude, in one pass (torch-free
// core of pxkern::relu_gate; PX stream A's activation).
//
//   y[i]    = x[i] > 0 ? x[i] : slope * x[i]
//   gate[i] = x[i] > 0 ? 1 : 0
//   returns max |x[i]|, or +inf if any x[i] is inf or NaN
//
// Stream A needs all three: y continues the forward, gate is what stream B multiplies by,
// and the peak tells whether A can stay in true scale (../../../pxkern/px/streams.py).
// PyTorch takes three passes over x for them (leaky_relu, sign, aminmax).
// y may be x itself (in-place ReLU); gate must not alias either.
// OpenMP over chunks of kChunk elements, each thread keeping its own peak. AVX2 path
// chosen at run time (../isa.h), portable loop otherwise.
//
// Work and traffic: n compares, selects and max per element; DRAM ~ 3 n sizeof(T).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../isa.h"
#include "../threads.h"

namespace pxkern {
namespace relu_gate {

using cpu::Isa;
using cpu::cpu_has_avx2_fma;
using cpu::select_isa;

// Elements per OpenMP work item: large enough that scheduling costs nothing, small
// enough that a 1 MB activation still splits between two threads.
constexpr int64_t kChunk = 1 << 15;

// [begin, end) of the arrays; returns the peak of that range (+inf if not finite).
template <typename T>
T range_portable(const T* x, int64_t begin, int64_t end, T slope, T* y, T* gate) {
  T peak = 0;
  bool finite = true;
  for (int64_t i = begin; i < end; ++i) {
    const T v = x[i];
    const bool positive = v > T(0);
    gate[i] = positive ? T(1) : T(0);
    y[i] = positive ? v : slope * v;
    finite = finite && std::isfinite(v);
    peak = std::max(peak, std::fabs(v));
  }
  return finite ? peak : std::numeric_limits<T>::infinity();
}

#if PXKERN_HAVE_AVX2_PATH
PXKERN_AVX2_FN __m256 select(__m256 mask, __m256 a, __m256 b) { return _mm256_blendv_ps(b, a, mask); }
PXKERN_AVX2_FN __m256d select(__m256d mask, __m256d a, __m256d b) { return _mm256_blendv_pd(b, a, mask); }
PXKERN_AVX2_FN __m256 greater(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
PXKERN_AVX2_FN __m256d greater(__m256d a, __m256d b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
// True where |a| is not <= the largest finite value: inf or NaN.
PXKERN_AVX2_FN __m256 not_finite(__m256 abs) {
  return _mm256_cmp_ps(abs, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
}
PXKERN_AVX2_FN __m256d not_finite(__m256d abs) {
  return _mm256_cmp_pd(abs, _mm256_set1_pd(std::numeric_limits<double>::max()), _CMP_NLE_UQ);
}
PXKERN_AVX2_FN __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
PXKERN_AVX2_FN __m256d max(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
PXKERN_AVX2_FN __m256 bitwise_or(__m256 a, __m256 b) { return _mm256_or_ps(a, b); }
PXKERN_AVX2_FN __m256d bitwise_or(__m256d a, __m256d b) { return _mm256_or_pd(a, b); }
PXKERN_AVX2_FN bool any(__m256 a) { return _mm256_movemask_ps(a) != 0; }
PXKERN_AVX2_FN bool any(__m256d a) { return _mm256_movemask_pd(a) != 0; }

template <typename T>
PXKERN_AVX2_FN T range_avx2(const T* x, int64_t begin, int64_t end, T slope, T* y, T* gate) {
  using S = cpu::Avx2<T>;
  using Vec = typename S::Vec;
  constexpr int64_t L = S::kLanes;
  const Vec zero = S::zero(), one = S::set1(T(1)), slopes = S::set1(slope);
  Vec peak = zero, bad = zero;
  int64_t i = begin;
  for (; i + L <= end; i += L) {
    const Vec v = S::load(x + i);
    const Vec positive = greater(v, zero);
    const Vec abs = S::abs(v);
    S::store(gate + i, select(positive, one, zero));
    S::store(y + i, select(positive, v, S::mul(slopes, v)));
    peak = max(peak, abs);
    bad = bitwise_or(bad, not_finite(abs));
  }
  alignas(32) T lanes[L];
  S::store(lanes, peak);
  T result = *std::max_element(lanes, lanes + L);
  const T tail = range_portable(x, i, end, slope, y, gate);
  if (any(bad) || std::isinf(tail)) return std::numeric_limits<T>::infinity();
  return std::max(result, tail);
}
#endif

// The whole array; num_threads <= 0 uses the OpenMP default.
template <typename T>
T relu_gate(const T* x, int64_t n, T slope, T* y, T* gate, Isa isa, int num_threads) {
  [[maybe_unused]] const bool avx2 = cpu::use_avx2(isa);
  (void)num_threads;  // read by the OpenMP pragma only
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  T peak = 0;
#pragma omp parallel for num_threads(cpu::resolve_threads(num_threads)) reduction(max : peak) \
    if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
#if PXKERN_HAVE_AVX2_PATH
    if (avx2) {
      peak = std::max(peak, range_avx2(x, begin, end, slope, y, gate));
      continue;
    }
#endif
    peak = std::max(peak, range_portable(x, begin, end, slope, y, gate));
  }
  return peak;
}

}  // namespace relu_gate
}  // namespace pxkern
