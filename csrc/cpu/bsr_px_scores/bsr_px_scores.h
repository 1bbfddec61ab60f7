// PX scores of a block-sparse Linear weight on the CPU (torch-free core of
// pxkern::bsr_px_scores): the score epilogue of stream C's backward pass (px-spec section 6,
// S_l = |g^T h| * W^2) for a W stored in BSR form.
//
// Inputs (row-major, contiguous):
//   values          [nnz_blocks, bm, bn]  W [M, K] in BSR form, as in
//   row_offsets     [M / bm + 1] int32    ../bsr_dense_mm/bsr_dense_mm.h (the structure must
//   column_indices  [nnz_blocks] int32    pass bsr_dense_mm::check_structure)
//   grad_out g      [B, M]                cotangents of y = x (W∘W)^T
//   inputs x        [B, K]                the rows the layer was evaluated on
// Output:
//   scores          [nnz_blocks, bm, bn]  the values layout; for block p of block row i and
//                                         block column j = column_indices[p]:
//     scores[p, r, c] = |sum_b g[b, i bm + r] x[b, j bn + c]| * values[p, r, c]^2,
//   i.e. |g^T x| ∘ W∘W restricted to the stored blocks. The dense g^T x [M, K] is never
//   formed; duplicate blocks each get their own score.
//
// Tiling: a block is cut into column blocks of at most kMaxVectors AVX vectors (balanced
// sizes) and row tiles of R <= kMaxAccumulators / V rows, register tiles of R x V ymm
// accumulators of g^T x. Per batch row b a tile does V vector loads of x row b, R broadcasts
// of g row b and R V FMAs. The batch is taken in chunks whose g panel (chunk x bm) and x
// panel (chunk x bn) stay in L1 while every tile of a block row reads them; a tile starts
// from zero on the first chunk and from the partial sums in scores on the others, and the
// last chunk applies the epilogue |acc| * w * w (w loaded from values, squared in
// registers) before the one store. Masked loads/stores handle a partial last vector.
// OpenMP (dynamic) over block rows. No allocation.
// AVX2+FMA path chosen at run time (see ../isa.h); a portable path with the same loops
// otherwise, or when PXKERN_CPU_ISA=portable.
//
// Work and traffic (s = sizeof(T), C = number of batch chunks, 1 when B <= ~100):
//   FLOPs  = 2 B nnz_blocks bm bn (+ 3 nnz_blocks bm bn for the epilogue)
//   DRAM   ~ s (2 nnz_blocks bm bn + B M + B K) + 4 (nnz_blocks + M / bm + 1);
//            C > 1 adds 2 s (C - 1) nnz_blocks bm bn for the partial sums.
//   cache  : each g panel is read once per block of its row and column block, each x panel
//            once per row tile, from L1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../bsr_dense_mm/bsr_dense_mm.h"

namespace pxkern {
namespace bsr_px_scores {

using cpu::Isa;
using cpu::cpu_has_avx2_fma;
using cpu::select_isa;
using bsr_dense_mm::balanced_start;
using bsr_dense_mm::check_structure;
using bsr_dense_mm::kMaxVectors;
using bsr_dense_mm::kPortableCols;
using bsr_dense_mm::kPortableRows;
using cpu::resolve_threads;

template <typename T>
struct Problem {
  const T* values;
  const int32_t* row_offsets;
  const int32_t* column_indices;
  int64_t m, k, bm, bn;
  const T* g;
  const T* x;
  T* scores;
};

// One register tile of block p: rows [r0, r0 + rows) x columns [c0, c0 + cols), summing
// batch rows [b0, b1). first: start from zero, else from scores; last: apply the epilogue.
struct Tile {
  int64_t p, row0, col0;  // block index, first row of g and first column of x of the block
  int64_t b0, b1;
  int64_t r0, rows, c0, cols;
  bool first, last;
};

// Batch rows per chunk: as many as keep a block row's g and x panels within
// kChunkBytes, at least kMinChunkRows so reloading the partial sums stays negligible.
constexpr int64_t kChunkBytes = 24 * 1024;
constexpr int64_t kMinChunkRows = 32;

inline int64_t rows_per_chunk(int64_t bm, int64_t bn, int64_t elem_size) {
  return std::max<int64_t>(kChunkBytes / ((bm + bn) * elem_size), kMinChunkRows);
}

template <typename T>
void tile_portable(const Problem<T>& pr, const Tile& t) {
  T acc[kPortableRows][kPortableCols];
  T* out = pr.scores + t.p * pr.bm * pr.bn;
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c)
      acc[r][c] = t.first ? T(0) : out[(t.r0 + r) * pr.bn + t.c0 + c];
  const T* g = pr.g + t.b0 * pr.m + t.row0 + t.r0;
  const T* x = pr.x + t.b0 * pr.k + t.col0 + t.c0;
  for (int64_t b = t.b0; b < t.b1; ++b, g += pr.m, x += pr.k)
    for (int64_t r = 0; r < t.rows; ++r)
      for (int64_t c = 0; c < t.cols; ++c) acc[r][c] += g[r] * x[c];
  const T* w = pr.values + t.p * pr.bm * pr.bn;
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c) {
      const int64_t q = (t.r0 + r) * pr.bn + t.c0 + c;
      out[q] = t.last ? std::abs(acc[r][c]) * w[q] * w[q] : acc[r][c];
    }
}

#if PXKERN_HAVE_AVX2_PATH

using bsr_dense_mm::kMaxAccumulators;
using cpu::Avx2;

template <typename T, int R, int V, bool kTail>
PXKERN_AVX2_FN void tile_avx2(const Problem<T>& pr, const Tile& t, __m256i tail) {
  using S = Avx2<T>;
  using Vec = typename S::Vec;
  constexpr int L = S::kLanes;
  const int64_t offset = t.p * pr.bm * pr.bn + t.r0 * pr.bn + t.c0;
  T* out = pr.scores + offset;
  const int64_t bn = pr.bn;
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const T* q = out + r * bn + v * L;
      acc[r][v] = t.first ? S::zero() : (kTail && v == V - 1) ? S::maskload(q, tail) : S::load(q);
    }
  const T* g = pr.g + t.b0 * pr.m + t.row0 + t.r0;
  const T* x = pr.x + t.b0 * pr.k + t.col0 + t.c0;
  for (int64_t b = t.b0; b < t.b1; ++b, g += pr.m, x += pr.k) {
    Vec xv[V];
    for (int v = 0; v < V; ++v)
      xv[v] = (kTail && v == V - 1) ? S::maskload(x + v * L, tail) : S::load(x + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec gr = S::set1(g[r]);
      for (int v = 0; v < V; ++v) acc[r][v] = S::fma(gr, xv[v], acc[r][v]);
    }
  }
  const T* w = pr.values + offset;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const bool partial = kTail && v == V - 1;
      if (t.last) {
        const T* q = w + r * bn + v * L;
        const Vec wv = partial ? S::maskload(q, tail) : S::load(q);
        acc[r][v] = S::mul(S::abs(acc[r][v]), S::mul(wv, wv));
      }
      T* q = out + r * bn + v * L;
      if (partial) {
        S::maskstore(q, tail, acc[r][v]);
      } else {
        S::store(q, acc[r][v]);
      }
    }
}

template <typename T>
struct ScoreTile {
  template <int R, int V, bool kTail>
  PXKERN_AVX2_FN static void run(const Problem<T>& pr, const Tile& t, __m256i tail) {
    tile_avx2<T, R, V, kTail>(pr, t, tail);
  }
};

#endif  // PXKERN_HAVE_AVX2_PATH

// All blocks of block row i, batch chunk by batch chunk.
template <typename T>
void block_row(const Problem<T>& pr, bool avx2, int64_t i, int64_t batch) {
#if PXKERN_HAVE_AVX2_PATH
  const int64_t lanes = avx2 ? Avx2<T>::kLanes : 1;
  const int64_t max_block_cols = avx2 ? kMaxVectors * lanes : kPortableCols;
#else
  const int64_t lanes = 1, max_block_cols = kPortableCols;
#endif
  const int64_t units = (pr.bn + lanes - 1) / lanes;
  const int64_t col_blocks = (units * lanes + max_block_cols - 1) / max_block_cols;
  const int64_t chunk = rows_per_chunk(pr.bm, pr.bn, sizeof(T));
  Tile t;
  t.row0 = i * pr.bm;
  // At least one pass, so that an empty batch still writes zero scores.
  for (t.b0 = 0; t.b0 == 0 || t.b0 < batch; t.b0 += chunk) {
    t.b1 = std::min(batch, t.b0 + chunk);
    t.first = t.b0 == 0;
    t.last = t.b1 == batch;
    for (t.p = pr.row_offsets[i]; t.p < pr.row_offsets[i + 1]; ++t.p) {
      t.col0 = pr.column_indices[t.p] * pr.bn;
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        t.c0 = balanced_start(units, col_blocks, cb) * lanes;
        t.cols = std::min(pr.bn, balanced_start(units, col_blocks, cb + 1) * lanes) - t.c0;
        const int64_t max_rows =
            avx2 ? kMaxAccumulators / ((t.cols + lanes - 1) / lanes) : kPortableRows;
        const int64_t row_tiles = (pr.bm + max_rows - 1) / max_rows;
        for (int64_t rt = 0; rt < row_tiles; ++rt) {
          t.r0 = balanced_start(pr.bm, row_tiles, rt);
          t.rows = balanced_start(pr.bm, row_tiles, rt + 1) - t.r0;
#if PXKERN_HAVE_AVX2_PATH
          if (avx2) {
            bsr_dense_mm::dispatch_tile_avx2<T, ScoreTile<T>>(t.rows, t.cols, pr, t);
            continue;
          }
#endif
          tile_portable(pr, t);
        }
      }
    }
  }
}

// scores [nnz_blocks, bm, bn] = |g^T x| * values^2 on the stored blocks of W [m, k] (bm x bn
// blocks) for g [batch, m] and x [batch, k]. The structure must pass check_structure.
// num_threads <= 0 uses the OpenMP default.
template <typename T>
void bsr_px_scores(const T* values, const int32_t* row_offsets, const int32_t* column_indices,
                   int64_t m, int64_t k, int64_t bm, int64_t bn, const T* g, const T* x,
                   int64_t batch, T* scores, Isa isa, int num_threads) {
  const int64_t block_rows = m / bm;
  if (block_rows == 0 || row_offsets[block_rows] == 0) return;
  const bool avx2 = cpu::use_avx2(isa);
  const Problem<T> pr{values, row_offsets, column_indices, m, k, bm, bn, g, x, scores};
#pragma omp parallel for schedule(dynamic) num_threads(resolve_threads(num_threads)) \
    if (block_rows > 1)
  for (int64_t i = 0; i < block_rows; ++i) block_row(pr, avx2, i, batch);
}

}  // namespace bsr_px_scores
}  // namespace pxkern
