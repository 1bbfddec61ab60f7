// Shared by the standalone core tests (csrc/cpu/<op>/test_<op>_core.cpp): which ISA paths
// to check on this CPU, and the lengths that exercise a chunked elementwise core.
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>

#include "isa.h"

namespace pxkern {
namespace core_test {

// The portable path always, and the AVX2 path where this CPU has it (said if not).
inline std::vector<cpu::Isa> tested_isas() {
  std::vector<cpu::Isa> isas{cpu::Isa::kPortable};
  if (cpu::cpu_has_avx2_fma()) {
    isas.push_back(cpu::Isa::kAvx2);
  } else {
    std::printf("CPU lacks AVX2+FMA: only the portable path is tested\n");
  }
  return isas;
}

// Empty, shorter than a vector, one vector, ragged, and around and across chunk
// boundaries of a core that works in chunks of `chunk` elements.
inline std::vector<int64_t> lengths_around(int64_t chunk) {
  return {0, 1, 7, 8, 13, 64, chunk - 3, chunk + 5, 3 * chunk + 11};
}

}  // namespace core_test
}  // namespace pxkern
