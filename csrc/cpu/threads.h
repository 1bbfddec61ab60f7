// Threading shared by the torch-free CPU kernel cores (csrc/cpu/<op>/<op>.h): the thread
// count (the ATen glue passes at::get_num_threads(), the core tests pass 0) and the split
// of a parallel loop's items between the threads (OwnedRanges).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

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

// Items 0..n of a parallel loop, one contiguous range per thread. A thread takes the items
// of its own range in order, then helps with the other ranges (a counter per range, each
// on its own cache line).
//
// Why not OpenMP's dynamic schedule: it hands each item to whichever thread comes first,
// so from call to call the data an item writes moves between cores, and the next op
// (PyTorch splits elementwise ops into contiguous ranges) reads it from the other core.
// When this project's VM has its two vCPUs on cores that share no cache, that cost
// bsr_dense_mm up to 1.7x (see there). Owned ranges keep an item on the same thread call
// after call, and helping keeps a thread whose vCPU the host slows from holding up the
// others.
class OwnedRanges {
 public:
  // ends[t]: the end of thread t's range; ascending, the last is the number of items.
  explicit OwnedRanges(const std::vector<int64_t>& ends) : ranges_(ends.size()) {
    for (size_t t = 0; t < ends.size(); ++t) {
      ranges_[t].next.store(t == 0 ? 0 : ends[t - 1], std::memory_order_relaxed);
      ranges_[t].end = ends[t];
    }
  }

  // Calls body(item) for every item this thread takes. Every thread of the team calls it
  // with its index (thread_index()); a team smaller than the ranges still does every item.
  template <typename Body>
  void run(int self, Body&& body) {
    const int64_t n = static_cast<int64_t>(ranges_.size());
    for (int64_t j = 0; j < n; ++j) {
      Range& range = ranges_[(self + j) % n];
      for (int64_t item = range.next.fetch_add(1, std::memory_order_relaxed); item < range.end;
           item = range.next.fetch_add(1, std::memory_order_relaxed))
        body(item);
    }
  }

 private:
  struct alignas(64) Range {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Range> ranges_;
};

}  // namespace cpu
}  // namespace pxkern
