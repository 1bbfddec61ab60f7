// Instruction-set plumbing shared by the torch-free CPU kernel cores (csrc/cpu/<op>/<op>.h).
// Needs only the standard library and a GCC/Clang-compatible compiler; no PyTorch.
//
// Why run-time dispatch: the extension and the core tests are compiled for the baseline
// ISA of the target (x86-64 without -mavx2 / -march=native), so one binary runs on every
// CPU of that architecture. The fast kernels are compiled for AVX2+FMA function by function
// (PXKERN_AVX2_FN, a GCC/Clang target attribute) and a core calls them only if the CPU it
// runs on has both extensions (cpu_has_avx2_fma, via __builtin_cpu_supports). Every core
// also has a portable path with the same loops, used otherwise.
//
// Provides:
//   PXKERN_HAVE_AVX2_PATH  1 if this compiler/target can build the AVX2 path (x86 with
//                          GCC or Clang; <immintrin.h> is then included), else 0. Code that
//                          uses AVX2 types or intrinsics must sit inside #if on it.
//   PXKERN_AVX2_FN         marks a function (inline) as compiled for AVX2+FMA. Call such a
//                          function only when cpu_has_avx2_fma() is true.
//   cpu::Isa               which path a core should take: kPortable or kAvx2.
//   cpu::cpu_has_avx2_fma  whether this CPU supports AVX2 and FMA.
//   cpu::select_isa        the path to use: the best one of this CPU, unless overridden.
//   cpu::use_avx2          whether a core given an Isa takes its AVX2 path.
//   cpu::Avx2<T>           256-bit vector wrappers for T = float / double (AVX2 path only),
//                          so that a kernel is written once as a template over T.
//
// Override: PXKERN_CPU_ISA=portable in the environment makes select_isa() return
// Isa::kPortable even on an AVX2 CPU. The tests use it to exercise both paths on one
// machine; it also helps to rule out the vector path when chasing a numerical difference.
// Any other value (or none) means automatic choice. The variable is read on every call.
// The override can only lower the ISA: cores re-check cpu_has_avx2_fma() before taking the
// AVX2 path, so passing Isa::kAvx2 on a CPU without AVX2 still runs the portable path.
#pragma once

#include <cstdlib>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PXKERN_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define PXKERN_AVX2_FN __attribute__((target("avx2,fma"))) inline
#else
#define PXKERN_HAVE_AVX2_PATH 0
#endif

namespace pxkern {
namespace cpu {

enum class Isa { kPortable, kAvx2 };

inline bool cpu_has_avx2_fma() {
#if PXKERN_HAVE_AVX2_PATH
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Best ISA of this CPU, unless PXKERN_CPU_ISA=portable forces the portable path (see the
// file header).
inline Isa select_isa() {
  const char* forced = std::getenv("PXKERN_CPU_ISA");
  if (forced != nullptr && std::string(forced) == "portable") return Isa::kPortable;
  return cpu_has_avx2_fma() ? Isa::kAvx2 : Isa::kPortable;
}

// Whether a core given `isa` takes its AVX2 path: asked for it, and this CPU (and build)
// has it. False wherever PXKERN_HAVE_AVX2_PATH is 0, so a core can test it anywhere.
inline bool use_avx2(Isa isa) { return isa == Isa::kAvx2 && cpu_has_avx2_fma(); }

#if PXKERN_HAVE_AVX2_PATH

// One ymm register of T: kLanes elements, unaligned loads/stores, masked loads/stores for a
// partial last vector (mask from first_lanes), broadcast, multiply, fused multiply-add and
// absolute value.
template <typename T>
struct Avx2;

template <>
struct Avx2<float> {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  PXKERN_AVX2_FN static Vec zero() { return _mm256_setzero_ps(); }
  PXKERN_AVX2_FN static Vec set1(float v) { return _mm256_set1_ps(v); }
  PXKERN_AVX2_FN static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  PXKERN_AVX2_FN static Vec maskload(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  PXKERN_AVX2_FN static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  PXKERN_AVX2_FN static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  PXKERN_AVX2_FN static Vec abs(Vec a) { return _mm256_andnot_ps(set1(-0.0f), a); }
  PXKERN_AVX2_FN static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  PXKERN_AVX2_FN static void maskstore(float* p, __m256i m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  // All-ones in lanes [0, n).
  PXKERN_AVX2_FN static __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

template <>
struct Avx2<double> {
  using Vec = __m256d;
  static constexpr int kLanes = 4;
  PXKERN_AVX2_FN static Vec zero() { return _mm256_setzero_pd(); }
  PXKERN_AVX2_FN static Vec set1(double v) { return _mm256_set1_pd(v); }
  PXKERN_AVX2_FN static Vec load(const double* p) { return _mm256_loadu_pd(p); }
  PXKERN_AVX2_FN static Vec maskload(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  PXKERN_AVX2_FN static Vec mul(Vec a, Vec b) { return _mm256_mul_pd(a, b); }
  PXKERN_AVX2_FN static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_pd(a, b, c); }
  PXKERN_AVX2_FN static Vec abs(Vec a) { return _mm256_andnot_pd(set1(-0.0), a); }
  PXKERN_AVX2_FN static void store(double* p, Vec v) { _mm256_storeu_pd(p, v); }
  PXKERN_AVX2_FN static void maskstore(double* p, __m256i m, Vec v) { _mm256_maskstore_pd(p, m, v); }
  PXKERN_AVX2_FN static __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
};

#endif  // PXKERN_HAVE_AVX2_PATH

}  // namespace cpu
}  // namespace pxkern
