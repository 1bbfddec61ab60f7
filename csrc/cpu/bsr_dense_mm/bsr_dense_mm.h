// Block-sparse (BSR) times dense on the CPU (torch-free core of pxkern::bsr_dense_mm and
// pxkern::bsr_linear).
//
// Inputs (row-major, contiguous). W [M, K] in BSR form with bm x bn blocks:
//   values          [nnz_blocks, bm, bn]  each block row-major
//   row_offsets     [M / bm + 1] int32    the blocks of block row i are
//                                         [row_offsets[i], row_offsets[i + 1])
//   column_indices  [nnz_blocks] int32    block column of each block (any order within a
//                                         row; duplicates add up)
//   bias            [M] or nullptr
// Outputs:
//   bsr_dense_mm:  y [M, N] = W x + bias[:, None]   for x [K, N]
//   bsr_linear:    y [B, M] = x W^T + bias[None, :] for x [B, K]  (nn.Linear layout)
// With square_weight, both use W∘W instead of W (stream C of PX):
// each stored value is squared in registers as it is used, never in a copy of the weight.
// A compile-time template flag (Square) selects which operand holds W, so the plain
// product carries no extra instruction.
//
// One kernel serves both. Block row i owns an output region D_i (mm: rows i bm.. of y, all
// N columns; linear: all B rows, columns i bm..) that accumulates, over the row's blocks p
// (depth bn each), A_p B_p with
//   mm:     A_p = block p                (bm x bn, broadcast),  B_p = rows col_p bn.. of x
//   linear: A_p = columns col_p bn.. of x (B x bn, broadcast),  B_p = block p transposed
//           (bn x bm; the caller's transposed blocks, or all blocks transposed once per
//           call into a scratch buffer).
//
// Tiling: D_i is cut into column blocks of at most kMaxVectors AVX vectors and row tiles of
// R <= kMaxAccumulators / V rows (sizes balanced), register tiles of R x V ymm
// accumulators. Per depth step a tile does V vector loads of B_p, R broadcasts of A_p and
// R V FMAs; it is stored once per chunk. The row's blocks are taken in chunks sized so
// that a chunk's A and B panels (~kChunkBytes) stay in L2 while every tile of the region
// reads them; a tile starts from the bias on the first chunk and from y on the others.
// Masked loads/stores handle a partial last vector, so nothing is read past x or y.
// bsr_dense_mm packs x into panels of one column block ([N / W, K, W], W = 24 floats /
// 12 doubles) when the average block column is used by >= kMinPanelReuse block rows: x
// rows n s bytes apart (power-of-two n) fall into a few L1 sets and evict each other
// between the row tiles; packed rows are W s bytes apart. Each thread packs the block
// columns its block rows use into panels of its own.
// OpenMP over block rows, each region cut into parts along N (mm) or B (linear) when there
// are fewer than 4 block rows per thread, or when x is too large for the caches (parts
// whose slice of x is ~kXPartBytes, run part by part); each thread owns a contiguous
// range of (part, region) items with a like share of the blocks and then helps with the
// others' (see multiply). No allocation in the hot loop: the packed x and bsr_linear's
// transposed blocks live in a per-thread workspace kept across calls.
// AVX2+FMA path chosen at run time (see ../isa.h); a portable path with the same loops
// otherwise, or when PXKERN_CPU_ISA=portable.
//
// Work and traffic (N := B for linear, s = sizeof(T)):
//   FLOPs  = 2 nnz_blocks bm bn N; square_weight adds one multiply per weight element
//            loaded into a register (the same traffic).
//   DRAM   ~ s (nnz_blocks bm bn + K N + M N) + 4 (nnz_blocks + M / bm + 1), the values
//            once per part when x is cut into parts (they then come from L3); linear
//            without the caller's transposed blocks also reads values and writes and reads
//            their transposed copy (3 s nnz_blocks bm bn instead of 1).
//            bsr_dense_mm adds, per thread, a read and write of the part of x its block
//            rows use when it packs x (see above).
//   cache  : each block's values are read once per row group and column block of its
//            region, each x panel (bn rows x the column block) once per row tile from L1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "../aligned_buffer.h"
#include "../isa.h"
#include "../threads.h"

namespace pxkern {
namespace bsr_dense_mm {

// Run-time ISA choice, shared by all cores (../isa.h).
using cpu::Isa;
using cpu::cpu_has_avx2_fma;
using cpu::resolve_threads;
using cpu::select_isa;

// Empty if row_offsets/column_indices describe a valid block structure with block_rows rows
// and block_cols columns holding nnz_blocks blocks; else what is wrong. Reading out of
// bounds is the alternative, so this runs on every call (O(nnz_blocks + block_rows)).
inline std::string check_structure(const int32_t* row_offsets, const int32_t* column_indices,
                                   int64_t block_rows, int64_t block_cols, int64_t nnz_blocks) {
  if (row_offsets[0] != 0)
    return "row_offsets[0] must be 0, got " + std::to_string(row_offsets[0]);
  if (row_offsets[block_rows] != nnz_blocks)
    return "row_offsets[-1] must equal the number of blocks " + std::to_string(nnz_blocks) +
           ", got " + std::to_string(row_offsets[block_rows]);
  for (int64_t i = 0; i < block_rows; ++i) {
    if (row_offsets[i + 1] < row_offsets[i])
      return "row_offsets must be non-decreasing, but row_offsets[" + std::to_string(i + 1) +
             "] = " + std::to_string(row_offsets[i + 1]) + " < row_offsets[" +
             std::to_string(i) + "] = " + std::to_string(row_offsets[i]);
  }
  for (int64_t p = 0; p < nnz_blocks; ++p) {
    if (column_indices[p] < 0 || column_indices[p] >= block_cols)
      return "column_indices[" + std::to_string(p) + "] = " + std::to_string(column_indices[p]) +
             " is outside [0, " + std::to_string(block_cols) + ")";
  }
  return {};
}

// Columns per packed panel of x in bsr_dense_mm: one column block of kMaxVectors AVX
// vectors (24 floats, 12 doubles), for both ISA paths.
constexpr int64_t kMaxVectors = 3;
// bsr_dense_mm packs x only if its panels are used by this many block rows on average:
// packing costs a pass over x, conflict misses cost a fraction of that per use. Measured
// on the 2048 x 2048 W, x 2048 x 256 product, alternated in one process: packing gains
// 3-4% at an average use of 6.4 (32x32 blocks at density 0.1) and 11% (64x64 at 0.2),
// and loses 5-8% at 3.2 (32x32 at 0.05).
constexpr int64_t kMinPanelReuse = 4;
template <typename T>
constexpr int64_t kPackedCols = kMaxVectors * 32 / static_cast<int64_t>(sizeof(T));

// Scratch memory of the calling thread for one use (Use tells the uses apart): at least
// `size` elements, aligned to a cache line (../aligned_buffer.h). It is kept and reused by the
// thread's later calls, grown when too small: a fresh multi-megabyte buffer per call comes
// from mmap, and its first-touch page faults cost as much as a low-density product.
enum class Use { kPackedX, kTransposedValues };

template <typename T, Use U>
T* workspace(int64_t size) {
  thread_local cpu::AlignedBuffer<T> buffer;
  thread_local int64_t capacity = 0;
  if (size > capacity) {
    buffer.reset();
    buffer = cpu::aligned_buffer<T>(size);
    capacity = size;
  }
  return buffer.get();
}

// Which operand of a Problem holds W and is squared in registers (square_weight): none, the
// broadcast operand A (bsr_dense_mm) or the vector operand B (bsr_linear).
enum class Square { kNone, kA, kB };

// One product as the kernel sees it (see the file header). Element (r, k) of A_p is
// a[p a_block + col_p a_col + r a_row + k]. Element (k, c) of B_p is
// b[p b_block + col_p b_col + k b_row + c] if b_packed_cols == 0, else column c lives in
// packed panel c / b_packed_cols at b + (c / b_packed_cols) b_panel (then + c % b_packed_cols
// instead of c). Region i starts at d + i d_block and its bias at bias + i bias_block,
// indexed by region row (bias_per_row) or column.
template <typename T>
struct Problem {
  const T* a;
  int64_t a_block, a_col, a_row;
  const T* b;
  int64_t b_block, b_col, b_row;
  int64_t b_packed_cols, b_panel;
  int64_t depth;
  const int32_t* row_offsets;
  const int32_t* column_indices;
  int64_t block_rows;
  T* d;
  int64_t d_row, d_block;
  int64_t rows, cols;  // of one region
  const T* bias;
  int64_t bias_block;
  bool bias_per_row;
  bool split_rows;  // split a region along its rows (else its columns) between threads
  // bsr_dense_mm with packing: b_* describe the packed panels, and each thread packs this
  // x [k, cols] into panels of its own (ThreadPanels); nullptr: b is read as is.
  const T* unpacked_x = nullptr;
  int64_t k = 0;  // columns of W: x holds k values per column (mm) or per row (linear)
};

// One register tile: rows [r0, r0 + rows) x columns [c0, c0 + cols) of region d, summing
// blocks [p_begin, p_end); first: start from the bias (or zero), else from d. B_p of the
// tile's first column starts at b + b_offset + p b_block + col_p b_col.
template <typename T>
struct Tile {
  T* d;
  int64_t b_offset;
  const T* bias_row;  // bias of region row r at bias_row[r], or nullptr
  const T* bias_col;  // bias of region column c at bias_col[c], or nullptr
  int64_t p_begin, p_end;
  int64_t r0, rows, c0, cols;
  bool first;
};

// Blocks per chunk: as many as keep a chunk's panels within kChunkBytes, at least one, and
// at least kMinChunkDepth depth steps so reloading the tile from y stays negligible.
// Longer chunks store and reload each tile fewer times; the panels of one column block
// then come from L2 instead of L1, which costs less. Measured on the 2048 x 2048 W,
// x 2048 x 256 product (Zen 3, 2 threads, alternated in one process), 64 KB against the
// 24 KB that fits L1: 5-9% faster at block densities 0.05-0.2 for 32x32 and 64x64 blocks
// in both layouts, equal for 16x16; 128 KB and unbounded chunks were 1-3% slower again.
constexpr int64_t kChunkBytes = 64 * 1024;
constexpr int64_t kMinChunkDepth = 32;
// x larger than this is taken to stream from memory, and regions are cut into parts whose
// slice of x is about kXPartBytes, within a core's L2 (see multiply).
constexpr int64_t kStreamedXBytes = 8 << 20;
constexpr int64_t kXPartBytes = 512 << 10;
// Region rows processed together against one chunk (bounds the A panel of a chunk).
constexpr int64_t kRowGroup = 64;

inline int64_t blocks_per_chunk(int64_t depth, int64_t group_rows, int64_t block_cols,
                                int64_t elem_size) {
  const int64_t panel_bytes = depth * (group_rows + block_cols) * elem_size;
  const int64_t by_size = kChunkBytes / std::max<int64_t>(panel_bytes, 1);
  const int64_t by_depth = (kMinChunkDepth + depth - 1) / std::max<int64_t>(depth, 1);
  return std::max<int64_t>({by_size, by_depth, 1});
}

// n items into `parts` contiguous balanced parts: start of part j.
inline int64_t balanced_start(int64_t n, int64_t parts, int64_t j) {
  return j * (n / parts) + std::min(j, n % parts);
}

// Portable path: same loops with plain arrays (the compiler may vectorize the column loop
// for the baseline ISA).
constexpr int64_t kPortableRows = 4, kPortableCols = 24;

template <typename T, Square Sq>
void tile_portable(const Problem<T>& pr, const Tile<T>& t) {
  T acc[kPortableRows][kPortableCols];
  for (int64_t r = 0; r < t.rows; ++r) {
    for (int64_t c = 0; c < t.cols; ++c) {
      const int64_t rr = t.r0 + r, cc = t.c0 + c;
      acc[r][c] = !t.first ? t.d[rr * pr.d_row + cc]
                  : t.bias_row != nullptr ? t.bias_row[rr]
                  : t.bias_col != nullptr ? t.bias_col[cc]
                                          : T(0);
    }
  }
  for (int64_t p = t.p_begin; p < t.p_end; ++p) {
    const int64_t col = pr.column_indices[p];
    const T* a = pr.a + p * pr.a_block + col * pr.a_col + t.r0 * pr.a_row;
    const T* b = pr.b + t.b_offset + p * pr.b_block + col * pr.b_col;
    for (int64_t k = 0; k < pr.depth; ++k, b += pr.b_row) {
      for (int64_t r = 0; r < t.rows; ++r) {
        const T w = Sq == Square::kA ? a[r * pr.a_row + k] * a[r * pr.a_row + k]
                                     : a[r * pr.a_row + k];
        for (int64_t c = 0; c < t.cols; ++c)
          acc[r][c] += w * (Sq == Square::kB ? b[c] * b[c] : b[c]);
      }
    }
  }
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c) t.d[(t.r0 + r) * pr.d_row + t.c0 + c] = acc[r][c];
}

#if PXKERN_HAVE_AVX2_PATH

using cpu::Avx2;

// 16 ymm registers: up to 12 accumulators, the V <= 3 vectors of B shared by the R rows,
// one broadcast of A.
constexpr int kMaxAccumulators = 12;

// kTail: the last of the V vectors is partial and goes through `tail` masked loads/stores.
template <typename T, Square Sq, int R, int V, bool kTail>
PXKERN_AVX2_FN void tile_avx2(const Problem<T>& pr, const Tile<T>& t, __m256i tail) {
  using S = Avx2<T>;
  using Vec = typename S::Vec;
  constexpr int L = S::kLanes;
  Vec acc[R][V];
  T* d = t.d + t.r0 * pr.d_row + t.c0;
  if (!t.first) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        const T* q = d + r * pr.d_row + v * L;
        acc[r][v] = (kTail && v == V - 1) ? S::maskload(q, tail) : S::load(q);
      }
  } else if (t.bias_row != nullptr) {
    for (int r = 0; r < R; ++r) {
      const Vec b = S::set1(t.bias_row[t.r0 + r]);
      for (int v = 0; v < V; ++v) acc[r][v] = b;
    }
  } else {
    for (int v = 0; v < V; ++v) {
      const T* q = t.bias_col + t.c0 + v * L;
      const Vec b = t.bias_col == nullptr             ? S::zero()
                    : (kTail && v == V - 1) ? S::maskload(q, tail)
                                            : S::load(q);
      for (int r = 0; r < R; ++r) acc[r][v] = b;
    }
  }
  const int64_t a_row = pr.a_row, b_row = pr.b_row, depth = pr.depth;
  for (int64_t p = t.p_begin; p < t.p_end; ++p) {
    const int64_t col = pr.column_indices[p];
    const T* a = pr.a + p * pr.a_block + col * pr.a_col + t.r0 * a_row;
    const T* b = pr.b + t.b_offset + p * pr.b_block + col * pr.b_col;
    for (int64_t k = 0; k < depth; ++k, b += b_row) {
      Vec bv[V];
      for (int v = 0; v < V; ++v) {
        bv[v] = (kTail && v == V - 1) ? S::maskload(b + v * L, tail) : S::load(b + v * L);
        if constexpr (Sq == Square::kB) bv[v] = S::mul(bv[v], bv[v]);
      }
      for (int r = 0; r < R; ++r) {
        Vec w = S::set1(a[r * a_row + k]);
        if constexpr (Sq == Square::kA) w = S::mul(w, w);
        for (int v = 0; v < V; ++v) acc[r][v] = S::fma(w, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      T* q = d + r * pr.d_row + v * L;
      if (kTail && v == V - 1) {
        S::maskstore(q, tail, acc[r][v]);
      } else {
        S::store(q, acc[r][v]);
      }
    }
}

// Register tiles of any BSR core go through dispatch_tile_avx2, which calls
// Kernel::template run<R, V, kTail>(args..., tail) for a tile of `rows` rows and `cols`
// columns: V = ceil(cols / lanes) <= kMaxVectors vectors, the last one partial (kTail,
// lanes masked by tail) if cols is not a multiple of the lanes, and R = rows
// (R V <= kMaxAccumulators).
template <typename Kernel, int V, bool kTail, int R = 1, typename... Args>
PXKERN_AVX2_FN void tile_avx2_rows(int64_t rows, __m256i tail, const Args&... args) {
  if constexpr (R * V <= kMaxAccumulators) {
    if (rows == R) {
      Kernel::template run<R, V, kTail>(args..., tail);
    } else {
      tile_avx2_rows<Kernel, V, kTail, R + 1>(rows, tail, args...);
    }
  }
}

template <typename T, typename Kernel, int V, typename... Args>
PXKERN_AVX2_FN void tile_avx2_tail(int64_t rows, int64_t cols, __m256i tail,
                                   const Args&... args) {
  if (cols % Avx2<T>::kLanes != 0) {
    tile_avx2_rows<Kernel, V, true>(rows, tail, args...);
  } else {
    tile_avx2_rows<Kernel, V, false>(rows, tail, args...);
  }
}

template <typename T, typename Kernel, typename... Args>
PXKERN_AVX2_FN void dispatch_tile_avx2(int64_t rows, int64_t cols, const Args&... args) {
  constexpr int64_t L = Avx2<T>::kLanes;
  const __m256i tail = Avx2<T>::first_lanes(static_cast<int>(cols % L));
  switch ((cols + L - 1) / L) {
    case 1: tile_avx2_tail<T, Kernel, 1>(rows, cols, tail, args...); break;
    case 2: tile_avx2_tail<T, Kernel, 2>(rows, cols, tail, args...); break;
    default: tile_avx2_tail<T, Kernel, 3>(rows, cols, tail, args...); break;
  }
}

template <typename T, Square Sq>
struct MultiplyTile {
  template <int R, int V, bool kTail>
  PXKERN_AVX2_FN static void run(const Problem<T>& pr, const Tile<T>& t, __m256i tail) {
    tile_avx2<T, Sq, R, V, kTail>(pr, t, tail);
  }
};

#endif  // PXKERN_HAVE_AVX2_PATH

// Region of block row i restricted to rows [r_lo, r_hi) x columns [c_lo, c_hi); c_lo is a
// multiple of the vector length.
template <typename T, Square Sq>
void region(const Problem<T>& pr, bool avx2, int64_t i, int64_t r_lo, int64_t r_hi,
            int64_t c_lo, int64_t c_hi) {
#if PXKERN_HAVE_AVX2_PATH
  const int64_t lanes = avx2 ? Avx2<T>::kLanes : 1;
  const int64_t max_block_cols = avx2 ? kMaxVectors * lanes : kPortableCols;
#else
  (void)avx2;
  const int64_t lanes = 1, max_block_cols = kPortableCols;
#endif
  // Column blocks: the packed panels of B, else whole vectors in balanced sizes
  // (5 vectors -> 3 + 2).
  const int64_t packed = pr.b_packed_cols;
  const int64_t unit = packed > 0 ? packed : lanes;
  const int64_t units = (c_hi - c_lo + unit - 1) / unit;
  const int64_t units_per_block = packed > 0 ? 1 : max_block_cols / lanes;
  const int64_t col_blocks = (units + units_per_block - 1) / units_per_block;
  const int64_t p_begin = pr.row_offsets[i], p_end = pr.row_offsets[i + 1];
  // The row's blocks in chunks of at most blocks_per_chunk, balanced (4 blocks with at
  // most 3 per chunk give 2 + 2, not 3 + 1: a one-block chunk runs its tiles at two thirds
  // of the speed of a three-block one).
  const int64_t max_chunk = blocks_per_chunk(pr.depth, std::min(kRowGroup, r_hi - r_lo),
                                             max_block_cols, sizeof(T));
  const int64_t chunks = std::max<int64_t>(1, (p_end - p_begin + max_chunk - 1) / max_chunk);
  const int64_t chunk = std::max<int64_t>(1, (p_end - p_begin + chunks - 1) / chunks);
  Tile<T> t;
  t.d = pr.d + i * pr.d_block;
  const T* bias = pr.bias != nullptr ? pr.bias + i * pr.bias_block : nullptr;
  t.bias_row = pr.bias_per_row ? bias : nullptr;
  t.bias_col = pr.bias_per_row ? nullptr : bias;
  for (int64_t g0 = r_lo; g0 < r_hi; g0 += kRowGroup) {
    const int64_t g1 = std::min(r_hi, g0 + kRowGroup);
    // At least one pass, so that a block row without blocks still writes its bias.
    for (t.p_begin = p_begin; t.p_begin == p_begin || t.p_begin < p_end; t.p_begin += chunk) {
      t.p_end = std::min(p_end, t.p_begin + chunk);
      t.first = t.p_begin == p_begin;
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        t.c0 = c_lo + balanced_start(units, col_blocks, cb) * unit;
        t.cols = std::min(c_hi, c_lo + balanced_start(units, col_blocks, cb + 1) * unit) - t.c0;
        t.b_offset = packed > 0 ? t.c0 / packed * pr.b_panel : t.c0;
        const int64_t max_rows =
            avx2 ? kMaxAccumulators / ((t.cols + lanes - 1) / lanes) : kPortableRows;
        const int64_t row_tiles = (g1 - g0 + max_rows - 1) / max_rows;
        for (int64_t rt = 0; rt < row_tiles; ++rt) {
          t.r0 = g0 + balanced_start(g1 - g0, row_tiles, rt);
          t.rows = g0 + balanced_start(g1 - g0, row_tiles, rt + 1) - t.r0;
#if PXKERN_HAVE_AVX2_PATH
          if (avx2) {
            dispatch_tile_avx2<T, MultiplyTile<T, Sq>>(t.rows, t.cols, pr, t);
            continue;
          }
#endif
          tile_portable<T, Sq>(pr, t);
        }
      }
    }
  }
}

// Row q of x [k, n] into row q of every panel of packed [panels, k, kPackedCols<T>], the
// columns past n zero. Inline vector copies: a memmove call per 24-float panel row cost
// more than the copy itself.
template <typename T>
void pack_row_portable(const T* row, int64_t n, int64_t k, T* packed) {
  constexpr int64_t W = kPackedCols<T>;
  for (int64_t c0 = 0; c0 < n; c0 += W, packed += k * W)
    for (int64_t c = 0; c < W; ++c) packed[c] = c0 + c < n ? row[c0 + c] : T(0);
}

#if PXKERN_HAVE_AVX2_PATH
template <typename T>
PXKERN_AVX2_FN void pack_row_avx2(const T* row, int64_t n, int64_t k, T* packed) {
  using S = Avx2<T>;
  constexpr int64_t L = S::kLanes, W = kPackedCols<T>;
  for (int64_t c0 = 0; c0 < n; c0 += W, packed += k * W)
    for (int64_t c = c0; c < c0 + W; c += L) {
      const int64_t left = n - c;
      S::store(packed + c - c0, left >= L  ? S::load(row + c)
                                : left > 0 ? S::maskload(row + c, S::first_lanes(left))
                                           : S::zero());
    }
}
#endif

// The calling thread's own packed copy of x (Problem::unpacked_x): the columns of one part
// of the regions (see multiply) of a block column's rows are packed when a block row of
// this thread first uses them, so that every panel a thread reads is one it wrote itself.
template <typename T>
class ThreadPanels {
 public:
  ThreadPanels(const Problem<T>& pr, bool avx2) : pr_(pr), avx2_(avx2) {
    packed_ = workspace<T, Use::kPackedX>((pr.cols + kPackedCols<T> - 1) /
                                          kPackedCols<T> * pr.b_panel);
    thread_local std::vector<uint8_t> packed_columns;
    packed_columns.resize(pr.k / pr.depth);
    done_ = packed_columns.data();
  }

  T* data() const { return packed_; }

  // Packs columns [c_lo, c_hi) (c_lo a multiple of kPackedCols) of the block columns of
  // block row i not packed yet for `part`; a new part starts afresh.
  void prepare(int64_t i, int64_t part, int64_t c_lo, int64_t c_hi) {
    const int64_t n = pr_.cols, k = pr_.k, rows = pr_.depth;
    if (part != part_) {
      std::fill(done_, done_ + k / rows, uint8_t(0));
      part_ = part;
    }
    for (int64_t p = pr_.row_offsets[i]; p < pr_.row_offsets[i + 1]; ++p) {
      const int64_t col = pr_.column_indices[p];
      if (done_[col]) continue;
      done_[col] = 1;
      for (int64_t q = col * rows; q < (col + 1) * rows; ++q) {
        const T* row = pr_.unpacked_x + q * n + c_lo;
        T* dst = packed_ + c_lo / kPackedCols<T> * pr_.b_panel + q * kPackedCols<T>;
#if PXKERN_HAVE_AVX2_PATH
        if (avx2_) {
          pack_row_avx2(row, c_hi - c_lo, k, dst);
          continue;
        }
#endif
        pack_row_portable(row, c_hi - c_lo, k, dst);
      }
    }
  }

 private:
  const Problem<T>& pr_;
  bool avx2_;
  T* packed_ = nullptr;
  uint8_t* done_ = nullptr;
  int64_t part_ = -1;
};

// Range ends (cpu::OwnedRanges) for items 0..items, item % rows being the block row, with
// about equal work per thread: a row's blocks + 1 (a row without blocks still writes y).
inline std::vector<int64_t> block_row_ranges(const int32_t* row_offsets, int64_t items,
                                             int64_t rows, int threads) {
  const int64_t total = items / rows * (row_offsets[rows] + rows);
  std::vector<int64_t> ends(threads, items);
  int64_t t = 0, done = 0;
  for (int64_t item = 0; item < items && t + 1 < threads; ++item) {
    const int64_t i = item % rows;
    done += row_offsets[i + 1] - row_offsets[i] + 1;
    while (t + 1 < threads && done * threads >= total * (t + 1)) ends[t++] = item + 1;
  }
  return ends;
}

template <typename T, Square Sq>
void multiply(const Problem<T>& pr, Isa isa, int num_threads) {
  if (pr.block_rows == 0 || pr.rows == 0 || pr.cols == 0) return;
  const bool avx2 = cpu::use_avx2(isa);
#if PXKERN_HAVE_AVX2_PATH
  const int64_t lanes = avx2 ? Avx2<T>::kLanes : 1;
#else
  const int64_t lanes = 1;
#endif
  const int threads = resolve_threads(num_threads);
  // Regions are cut into `parts` along N (mm, in whole packed panels or vectors) or the
  // batch (linear): as far as needed for ~4 items per thread, and, when x is too large to
  // stay in cache (kStreamedXBytes), into parts whose slice of x fits kXPartBytes. Items
  // run part by part (item / block_rows is the part), so that a slice of x comes from
  // memory once and from cache for every block row, not once per block.
  const int64_t col_unit = pr.b_packed_cols > 0 ? pr.b_packed_cols : lanes;
  const int64_t split_units = pr.split_rows ? pr.rows : (pr.cols + col_unit - 1) / col_unit;
  const int64_t x_bytes =
      (pr.split_rows ? pr.rows : pr.cols) * pr.k * static_cast<int64_t>(sizeof(T));
  const int64_t parts = std::min(
      split_units,
      std::max({int64_t{1}, (4 * threads + pr.block_rows - 1) / pr.block_rows,
                x_bytes > kStreamedXBytes ? (x_bytes + kXPartBytes - 1) / kXPartBytes : 1}));
  const int64_t items = pr.block_rows * parts;
  // Threads own ranges of regions with a like share of the blocks (cpu::OwnedRanges),
  // so that a row of y, and with packing a thread's x panels, stay on one core from call
  // to call. With OpenMP's dynamic schedule, when this VM's two vCPUs sat on cores that
  // share no cache, the 2048 x 2048 W with 32 x 32 blocks at block density 0.1 times x
  // 2048 x 256 took 1.9 ms instead of 1.14 ms (C++ harness, phase after phase).
  cpu::OwnedRanges ranges(block_row_ranges(pr.row_offsets, items, pr.block_rows, threads));
  // An exception must not leave an OpenMP region: a thread that cannot allocate its panels
  // leaves its range to the others, and the failure is raised after the region.
  std::exception_ptr failure;
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    Problem<T> mine = pr;
    std::optional<ThreadPanels<T>> panels;
    bool ready = true;
    if (pr.unpacked_x != nullptr) {
      try {
        panels.emplace(pr, avx2);
        mine.b = panels->data();
      } catch (...) {
        ready = false;
#pragma omp critical(pxkern_bsr_failure)
        failure = std::current_exception();
      }
    }
    if (ready) ranges.run(cpu::thread_index(), [&](int64_t item) {
      const int64_t i = item % pr.block_rows, part = item / pr.block_rows;
      const int64_t lo = balanced_start(split_units, parts, part);
      const int64_t hi = balanced_start(split_units, parts, part + 1);
      if (pr.split_rows) {
        region<T, Sq>(mine, avx2, i, lo, hi, 0, pr.cols);
        return;
      }
      const int64_t c_lo = lo * col_unit, c_hi = std::min(pr.cols, hi * col_unit);
      if (panels) panels->prepare(i, part, c_lo, c_hi);
      region<T, Sq>(mine, avx2, i, 0, pr.rows, c_lo, c_hi);
    });
  }
  if (failure) std::rethrow_exception(failure);
}

// The instantiation of multiply that squares `weight` (the operand holding W) if
// square_weight, else the plain one.
template <typename T>
void multiply(const Problem<T>& pr, bool square_weight, Square weight, Isa isa,
              int num_threads) {
  switch (square_weight ? weight : Square::kNone) {
    case Square::kNone: multiply<T, Square::kNone>(pr, isa, num_threads); break;
    case Square::kA: multiply<T, Square::kA>(pr, isa, num_threads); break;
    case Square::kB: multiply<T, Square::kB>(pr, isa, num_threads); break;
  }
}

// y [m, n] = W x + bias[:, None] for W [m, k] in BSR form (bm x bn blocks) and x [k, n];
// W∘W instead of W if square_weight. bias may be nullptr. The structure must pass
// check_structure. num_threads <= 0 uses the OpenMP default.
template <typename T>
void bsr_dense_mm(const T* values, const int32_t* row_offsets, const int32_t* column_indices,
                  int64_t m, int64_t k, int64_t bm, int64_t bn, const T* x, int64_t n,
                  const T* bias, T* y, bool square_weight, Isa isa, int num_threads) {
  if (m == 0 || n == 0) return;
  Problem<T> pr{values, bm * bn, 0, bn,
                x, 0, bn * n, n, 0, 0,
                bn, row_offsets, column_indices, m / bm,
                y, n, bm * n, bm, n,
                bias, bm, /*bias_per_row=*/true, /*split_rows=*/false};
  pr.k = k;
  const int64_t nnz_blocks = row_offsets[m / bm];
  if (nnz_blocks >= kMinPanelReuse * (k / bn)) {
    // x in panels of kPackedCols columns, [panels, k, kPackedCols] (the last one
    // zero-padded), each thread its own (ThreadPanels): rows of a panel are then 96 bytes
    // apart instead of n sizeof(T), which for power-of-two n maps the rows of an x panel
    // to a few L1 sets and evicts them between row tiles.
    constexpr int64_t W = kPackedCols<T>;
    pr.b_col = bn * W;
    pr.b_row = W;
    pr.b_packed_cols = W;
    pr.b_panel = k * W;
    pr.unpacked_x = x;
  }
  multiply(pr, square_weight, Square::kA, isa, num_threads);
}

// y [batch, m] = x W^T + bias[None, :] for x [batch, k] (the nn.Linear layout); the other
// arguments as for bsr_dense_mm. transposed_blocks: values with every block transposed
// ([nnz_blocks, bn, bm]), as a layer with a fixed weight keeps it; nullptr: they are
// transposed here, into the calling thread's workspace, on every call (a pass that costs
// 10-20% of the product at block densities 0.05-0.2).
template <typename T>
void bsr_linear(const T* values, const int32_t* row_offsets, const int32_t* column_indices,
                int64_t m, int64_t k, int64_t bm, int64_t bn, const T* x, int64_t batch,
                const T* bias, T* y, bool square_weight, Isa isa, int num_threads,
                const T* transposed_blocks = nullptr) {
  if (batch == 0 || m == 0) return;
  const int64_t nnz_blocks = row_offsets[m / bm];
  // B_p is block p transposed, so that the vector operand runs along output columns.
  const T* transposed = transposed_blocks;
  if (transposed == nullptr) {
    T* scratch = workspace<T, Use::kTransposedValues>(nnz_blocks * bm * bn);
#pragma omp parallel for num_threads(resolve_threads(num_threads)) if (nnz_blocks > 1)
    for (int64_t p = 0; p < nnz_blocks; ++p) {
      const T* src = values + p * bm * bn;
      T* dst = scratch + p * bm * bn;
      for (int64_t r = 0; r < bm; ++r)
        for (int64_t c = 0; c < bn; ++c) dst[c * bm + r] = src[r * bn + c];
    }
    transposed = scratch;
  }
  Problem<T> pr{x, 0, bn, k,
                transposed, bn * bm, 0, bm, 0, 0,
                bn, row_offsets, column_indices, m / bm,
                y, m, bm, batch, bm,
                bias, bm, /*bias_per_row=*/false, /*split_rows=*/true};
  pr.k = k;
  multiply(pr, square_weight, Square::kB, isa, num_threads);
}

}  // namespace bsr_dense_mm
}  // namespace pxkern
