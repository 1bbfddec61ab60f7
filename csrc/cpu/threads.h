// OpenMP thread count shared by the torch-free CPU kernel cores (csrc/cpu/<op>/<op>.h):
// the ATen glue passes at::get_num_threads(), the core tests pass 0.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pxkern {
namespace cpu {

// num_threads if positive, else the OpenMP default (1 without OpenMP).
inline int resolve_threads(int num_threads) {
#if defined(_OPENMP)
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// Index of the calling thread in its OpenMP team (0 outside a parallel region or without
// OpenMP).
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace pxkern
