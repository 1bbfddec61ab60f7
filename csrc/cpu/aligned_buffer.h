// Heap buffers that start on a cache line: vector loads from them at multiples of the
// vector width never straddle two lines (std::vector and new[] align to 16 bytes only).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace pxkern {
namespace cpu {

constexpr int64_t kCacheLine = 64;

struct FreeAligned {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
using AlignedBuffer = std::unique_ptr<T[], FreeAligned>;

// Uninitialized storage for `size` elements (at least one cache line).
template <typename T>
AlignedBuffer<T> aligned_buffer(int64_t size) {
  const int64_t bytes = size * static_cast<int64_t>(sizeof(T));
  const int64_t lines = std::max<int64_t>(1, (bytes + kCacheLine - 1) / kCacheLine);
  void* p = std::aligned_alloc(kCacheLine, lines * kCacheLine);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

}  // namespace cpu
}  // namespace pxkern
