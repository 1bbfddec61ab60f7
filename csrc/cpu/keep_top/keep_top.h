// Keep masks of the top-k rule (torch-free core of pxkern::keep_top): the pruning rounds'
// mask selection in one read of the scores for the threshold and one for the masks.
//
// The rule (pxkern/pruning/threshold.py): over N scores and a density d, k = int((1 - d) N)
// and the threshold t is the k-th smallest score (none, -inf, when k == 0); an entry is
// kept if score > t, or with keep_ties if score == t and t > 0; and, given old masks, if
// it was kept before.
//
// The k-th smallest comes from a radix select on the scores' bits mapped to unsigned keys
// that order like the values (sign bit flipped for positives, all bits for negatives). torch.kthvalue (a quickselect over a copy) took
// 0.3-1.5 ms on ResNet-20's 270k scores; a pruning round's whole selection, with its NaN
// checks, comparisons and mask products as separate PyTorch ops, 1.5-3 ms.
//
// -0.0 and +0.0 get different keys but compare equal, so the masks are those of the rule
// whichever of them is the threshold. NaN has no place in the order: the caller checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pxkern {
namespace keep_top {

// One tensor's scores and, optionally, its old mask (nullptr: all kept).
template <typename T>
struct Part {
  const T* scores;
  const bool* mask;
  int64_t numel;
};

template <typename T>
using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
Key<T> key_of(T value) {
  Key<T> bits;
  std::memcpy(&bits, &value, sizeof(T));
  constexpr int kShift = 8 * sizeof(T) - 1;
  // Negative: all bits flipped (0 - 1 is all ones); positive: the sign bit. No branch.
  return bits ^ ((Key<T>(0) - (bits >> kShift)) | (Key<T>(1) << kShift));
}

template <typename T>
T value_of(Key<T> key) {
  constexpr int kShift = 8 * sizeof(T) - 1;
  const Key<T> bits = (key >> kShift) ? key ^ (Key<T>(1) << kShift) : ~key;
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Index of the first part holding a NaN, or -1.
template <typename T>
int64_t first_nan(const std::vector<Part<T>>& parts) {
  for (size_t p = 0; p < parts.size(); ++p)
    for (int64_t i = 0; i < parts[p].numel; ++i)
      if (std::isnan(parts[p].scores[i])) return static_cast<int64_t>(p);
  return -1;
}

// Adds to count[(key >> shift) & low_mask] for every key of `part` whose bits above
// shift + bits equal `prefix` (all keys when bits_fixed == 0). Four interleaved count
// arrays: runs of equal keys (the zero scores of every pruned weight) would otherwise
// wait on one counter's store for each increment.
template <typename T>
void count_bucket(const Part<T>& part, int bits_fixed, Key<T> prefix, int shift, Key<T> low_mask,
                  std::vector<uint32_t>& counts, size_t buckets) {
  constexpr int kKeyBits = 8 * sizeof(T);
  const int64_t n = part.numel;
  auto bucket_of = [&](T value, bool& shares) {
    const Key<T> key = key_of(value);
    shares = bits_fixed == 0 || (key >> (kKeyBits - bits_fixed)) == prefix;
    return static_cast<size_t>((key >> shift) & low_mask);
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      bool shares;
      const size_t b = bucket_of(part.scores[i + lane], shares);
      counts[lane * buckets + b] += shares;
    }
  }
  for (; i < n; ++i) {
    bool shares;
    const size_t b = bucket_of(part.scores[i], shares);
    counts[b] += shares;
  }
}

// The k-th smallest (1 <= k <= total entries) of all parts' scores, none NaN: the key's
// bits are fixed kBits at a time, most significant first, each by one pass that counts
// the next bits of the keys that share the prefix fixed so far; once the prefix's keys
// are few, they are gathered and nth_element picks the k-th.
template <typename T>
T kth_smallest(const std::vector<Part<T>>& parts, int64_t k) {
  constexpr int kBits = 10, kKeyBits = 8 * sizeof(T);
  constexpr size_t kBuckets = size_t(1) << kBits;
  constexpr int64_t kGatherBelow = 4096;
  std::vector<uint32_t> counts(4 * kBuckets);  // 16 KB
  Key<T> prefix = 0;  // the fixed high bits of the k-th key
  int fixed = 0;      // how many
  int64_t in_prefix = 0;
  for (const Part<T>& part : parts) in_prefix += part.numel;
  while (fixed < kKeyBits && in_prefix > kGatherBelow) {
    const int bits = std::min(kBits, kKeyBits - fixed);
    const int shift = kKeyBits - fixed - bits;
    std::fill(counts.begin(), counts.end(), 0);
    for (const Part<T>& part : parts)
      count_bucket(part, fixed, prefix, shift, (Key<T>(1) << bits) - 1, counts, kBuckets);
    Key<T> bucket = 0;
    int64_t in_bucket = 0;
    for (;; ++bucket) {
      in_bucket = int64_t(counts[bucket]) + counts[kBuckets + bucket] + counts[2 * kBuckets + bucket] +
                  counts[3 * kBuckets + bucket];
      if (in_bucket >= k) break;
      k -= in_bucket;
    }
    prefix = (prefix << bits) | bucket;
    fixed += bits;
    in_prefix = in_bucket;
  }
  if (fixed == kKeyBits) return value_of<T>(prefix);  // every key left is the k-th
  std::vector<Key<T>> keys;
  keys.reserve(in_prefix);
  for (const Part<T>& part : parts)
    for (int64_t i = 0; i < part.numel; ++i) {
      const Key<T> key = key_of(part.scores[i]);
      if (fixed == 0 || (key >> (kKeyBits - fixed)) == prefix) keys.push_back(key);
    }
  const auto nth = keys.begin() + (k - 1);
  std::nth_element(keys.begin(), nth, keys.end());
  return value_of<T>(*nth);
}

// Writes the kept entries of part `p` to kept[p] (numel bools each) and returns how many
// were kept in all parts. threshold -inf keeps every entry an old mask keeps.
template <typename T>
int64_t keep_above(const std::vector<Part<T>>& parts, T threshold, bool keep_ties,
                   const std::vector<bool*>& kept) {
  const bool ties = keep_ties && threshold > T(0);
  int64_t total = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const T* s = parts[p].scores;
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(parts[p].mask);
    uint8_t* out = reinterpret_cast<uint8_t*>(kept[p]);
    const int64_t n = parts[p].numel;
    // Branch-free loops per case, which the compiler vectorizes.
    if (ties) {
      for (int64_t i = 0; i < n; ++i) out[i] = s[i] >= threshold;
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = s[i] > threshold;
    }
    if (mask != nullptr)
      for (int64_t i = 0; i < n; ++i) out[i] &= mask[i];
    int64_t n_kept = 0;
    for (int64_t i = 0; i < n; ++i) n_kept += out[i];
    total += n_kept;
  }
  return total;
}

// The threshold of the rule for `density` over all parts: -inf when k == 0.
template <typename T>
T threshold_for(const std::vector<Part<T>>& parts, double density) {
  int64_t n = 0;
  for (const Part<T>& part : parts) n += part.numel;
  // As Python computes it: int((1.0 - density) * n), truncated toward zero.
  const int64_t k = static_cast<int64_t>((1.0 - density) * static_cast<double>(n));
  return k == 0 ? -std::numeric_limits<T>::infinity() : kth_smallest(parts, k);
}

}  // namespace keep_top
}  // namespace pxkern
