// Streams A and B at a ReLU of the fused PX plan, with the residual add before it, in one
// pass (torch-free core of pxkern::gate_streams; ../../../pxkern/px/fused.py).
//
//   a_in  = a + a_residual                       (residual optional)
//   b_in  = b + b_residual_scale * b_residual    (b_residual_scale: a power of two that
//                                                 aligns B's mantissas)
//   relu:     a_out = a_in > 0 ? a_in : 0,  b_out = a_in > 0 ? b_in : 0
//   no relu:  a_out = a_in,                 b_out = b_in
//   returns   peak_a = max |a_in|, peak_b = max |b_out|; +inf if any a_in or b_in is
//             inf or NaN
//
// Stream A continues with a_out; stream B with b_out, gated by A's sign; peak_a tells the
// plan that A stays in float32's safe range, peak_b is B's next normalizing exponent.
// Composed of PyTorch ops this is up to six passes over activation-sized tensors (two
// adds, relu, gate, product, aminmax); here it is one read of each input and one write of
// each output. a_out may be a and b_out may be b (in place); nothing else may alias.
// OpenMP over chunks of kChunk elements, each thread keeping its own peaks. The loop is
// written once; the AVX2+FMA instantiation (../isa.h) is vectorized by the compiler.
//
// Work and traffic: a few compares, selects and adds per element; DRAM ~ (2 + 2 with
// residuals + 2) n sizeof(T).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../isa.h"
#include "../threads.h"

namespace pxkern {
namespace gate_streams {

using cpu::Isa;
using cpu::cpu_has_avx2_fma;
using cpu::select_isa;

// Elements per OpenMP work item, as in ../relu_gate/relu_gate.h.
constexpr int64_t kChunk = 1 << 15;

template <typename T>
struct Arrays {
  const T* a;
  const T* b;
  const T* a_residual;  // nullptr: no residual add (then b_residual is nullptr too)
  const T* b_residual;
  T b_residual_scale;
  T* a_out;
  T* b_out;
};

template <typename T>
struct Peaks {
  T a = 0, b = 0;
  bool finite = true;
};

// [begin, end) of the arrays. Branch-free in the loop, so that the compiler vectorizes it.
template <typename T, bool kResidual, bool kRelu>
__attribute__((always_inline)) inline Peaks<T> range(const Arrays<T>& p, int64_t begin,
                                                     int64_t end) {
  constexpr T kMax = std::numeric_limits<T>::max();
  const T *a_in = p.a, *b_in = p.b, *a_residual = p.a_residual, *b_residual = p.b_residual;
  const T scale = p.b_residual_scale;
  T *a_out = p.a_out, *b_out = p.b_out;
  T peak_a = 0, peak_b = 0;
  int bad = 0;
  // Each element is read before it is written, so outputs aliasing their inputs (in place)
  // are safe; `simd` tells the compiler so, which it cannot prove.
#pragma omp simd reduction(max : peak_a, peak_b) reduction(| : bad)
  for (int64_t i = begin; i < end; ++i) {
    T a = a_in[i], b = b_in[i];
    if constexpr (kResidual) {
      a += a_residual[i];
      b += scale * b_residual[i];
    }
    const T abs_a = std::fabs(a), abs_b = std::fabs(b);
    // Not <= the largest finite value: inf or NaN (a NaN compares false both ways).
    bad |= static_cast<int>(!(abs_a <= kMax)) | static_cast<int>(!(abs_b <= kMax));
    peak_a = std::max(peak_a, abs_a);
    if constexpr (kRelu) {
      const bool positive = a > T(0);
      a = positive ? a : T(0);
      b = positive ? b : T(0);
    }
    peak_b = std::max(peak_b, std::fabs(b));
    a_out[i] = a;
    b_out[i] = b;
  }
  return {peak_a, peak_b, bad == 0};
}

template <typename T, bool kResidual, bool kRelu>
Peaks<T> range_portable(const Arrays<T>& p, int64_t begin, int64_t end) {
  return range<T, kResidual, kRelu>(p, begin, end);
}

#if PXKERN_HAVE_AVX2_PATH
template <typename T, bool kResidual, bool kRelu>
__attribute__((target("avx2,fma"))) Peaks<T> range_avx2(const Arrays<T>& p, int64_t begin,
                                                        int64_t end) {
  return range<T, kResidual, kRelu>(p, begin, end);
}
#endif

template <typename T, bool kResidual, bool kRelu>
Peaks<T> all_chunks(const Arrays<T>& p, int64_t n, Isa isa, int num_threads) {
  [[maybe_unused]] const bool avx2 = cpu::use_avx2(isa);
  (void)num_threads;  // read by the OpenMP pragma only
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  T peak_a = 0, peak_b = 0;
  int bad = 0;
#pragma omp parallel for num_threads(cpu::resolve_threads(num_threads)) \
    reduction(max : peak_a, peak_b) reduction(| : bad) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    Peaks<T> chunk;
#if PXKERN_HAVE_AVX2_PATH
    if (avx2) {
      chunk = range_avx2<T, kResidual, kRelu>(p, begin, end);
    } else
#endif
    {
      chunk = range_portable<T, kResidual, kRelu>(p, begin, end);
    }
    peak_a = std::max(peak_a, chunk.a);
    peak_b = std::max(peak_b, chunk.b);
    bad |= static_cast<int>(!chunk.finite);
  }
  return {peak_a, peak_b, bad == 0};
}

// The whole arrays (n elements each); num_threads <= 0 uses the OpenMP default. Returns
// the peaks, both +inf if a value is not finite.
template <typename T>
Peaks<T> gate_streams(const Arrays<T>& p, int64_t n, bool relu, Isa isa, int num_threads) {
  const bool residual = p.a_residual != nullptr;
  Peaks<T> peaks;
  if (residual) {
    peaks = relu ? all_chunks<T, true, true>(p, n, isa, num_threads)
                 : all_chunks<T, true, false>(p, n, isa, num_threads);
  } else {
    peaks = relu ? all_chunks<T, false, true>(p, n, isa, num_threads)
                 : all_chunks<T, false, false>(p, n, isa, num_threads);
  }
  if (!peaks.finite) {
    peaks.a = peaks.b = std::numeric_limits<T>::infinity();
  }
  return peaks;
}

}  // namespace gate_streams
}  // namespace pxkern
