// Direct sparse 2-D convolution on the CPU (torch-free core of pxkern::sparse_conv2d).
//
// Computes out = conv2d(x, weight + ones_scale (x) 1, bias, stride, padding, dilation,
// groups) for a weight that is mostly zeros, touching only its nonzero taps. The optional
// ones_scale adds ones_scale[co] to every weight of output channel co at the cost of one
// box filter per sample: conv2d(x, s (x) 1) = s (x) box(sum over channels of x). So a
// mostly-ones weight M runs as the sparse weight M - 1 with ones_scale 1.
//
// Inputs (row-major, contiguous):
//   x          [N, C_in, H, W], or [N, H, W, C_in] if channels_last
//   weight     [C_out, C_in / groups, kh, kw]   any values; zeros are skipped
//   bias       [C_out] or nullptr
//   ones_scale [C_out] or nullptr (groups == 1 only)
// Output:
//   out     [N, C_out, H_out, W_out] (or [N, H_out, W_out, C_out] if channels_last),
//           H_out = (H + 2 ph - dh (kh - 1) - 1) / sh + 1
//
// Algorithm:
//   1. pack_taps: per output channel, the list of nonzero taps (input channel, ky, kx,
//      value), stored as (offset into the prepared input sample, value) in CSR form.
//   2. Per input sample (in a per-thread scratch buffer, refilled only when the sample
//      changes) the zero-padded input is split into sh * sw polyphase planes:
//      plane (py, px) of channel c holds padded[c][py + sh i][px + sw j]. A tap (ky, kx)
//      then reads plane ((ky dh) % sh, (kx dw) % sw) at unit stride, shifted by
//      ((ky dh) / sh, (kx dw) / sw), so padding and stride cost no branches and no
//      strided loads in the hot loop. With stride 1 and no padding x is used in place
//      (channels-first x only: channels-last samples are transposed while prepared).
//   3. For each (sample, block of output channels) [OpenMP, dynamic over the blocks],
//      the output planes are cut into register tiles of R rows x V vectors (R V <= 12
//      accumulators, so a tile lives in ymm registers), run band of R rows by band, the
//      tiles of every channel of the block per band (the band's input rows stay in L1;
//      the portable path and samples read in place run plane by plane). For each tile
//      the loop over the channel's taps does one broadcast and R V fused multiply-adds
//      from shifted input rows; the tile is stored once. Partial last vectors use masked
//      loads/stores, so no load leaves the sample buffer. Channels-last: the item's
//      planes go to a per-thread scratch and are transposed into out once all are done,
//      so the tile stores stay unit-stride.
//   With ones_scale, each thread also sums its prepared sample over channels and box
//   filters that sum (the kh x kw all-ones taps, through the same tile code) into one
//   plane; every tile then starts from bias + ones_scale[co] * box instead of the bias.
//   An all-zero weight without ones_scale skips all of this: out is the bias.
//   AVX2+FMA path chosen at run time (see ../isa.h); a portable scalar path with the
//   same structure otherwise, or when PXKERN_CPU_ISA=portable.
//
// Work and traffic (nnz = nonzeros of weight, P = H_out W_out):
//   FLOPs  = 2 nnz N P  (one FMA per nonzero tap per output pixel per sample)
//   DRAM   ~ sizeof(T) (N C_in H W + N C_out P) + nnz (8 + sizeof(T)) per call
//   cache  : the prepared sample (C_in sh sw Hph Wph elements, 25-170 KB for CIFAR
//            layers) is re-read from L1/L2 by every output channel; each tap of a tile
//            reads R V vectors from it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../aligned_buffer.h"
#include "../isa.h"
#include "../threads.h"

namespace pxkern {
namespace sparse_conv2d {

// Run-time ISA choice, shared by all cores (../isa.h).
using cpu::Isa;
using cpu::cpu_has_avx2_fma;
using cpu::select_isa;

// Sizes of one convolution and of the prepared (padded, polyphase-split) input sample.
struct Geometry {
  int64_t n, c_in, h, w;
  int64_t c_out, kh, kw, groups;
  int64_t sh, sw, ph, pw, dh, dw;
  bool channels_last;            // x and out are [N, H, W, C] instead of [N, C, H, W]
  int64_t h_out = 0, w_out = 0;
  // Rows of one polyphase plane, and its row stride: its columns rounded up to whole
  // vectors (kRowAlignment), so that in a cache-line aligned sample every tap without a
  // column shift loads aligned vectors (the extra columns are zeros no output reads).
  int64_t hph = 0, wph = 0;
  bool in_place = false;  // channels-first, stride 1, no padding: x is the prepared sample
  int64_t sample_numel = 0;      // elements of one prepared sample

  int64_t c_in_per_group() const { return c_in / groups; }
  // Elements of one channel of the prepared sample (its sh sw polyphase planes).
  int64_t channel_numel() const { return sh * sw * hph * wph; }
  int64_t c_out_per_group() const { return c_out / groups; }
};

// 8 elements: a ymm vector of float (two of double).
constexpr int64_t kRowAlignment = 8;

// Output size as conv2d defines it; <= 0 when the dilated kernel does not fit.
inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

inline Geometry make_geometry(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,
                              int64_t kh, int64_t kw, int64_t groups, int64_t sh, int64_t sw,
                              int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                              bool channels_last) {
  Geometry g{n, c_in, h, w, c_out, kh, kw, groups, sh, sw, ph, pw, dh, dw, channels_last};
  g.h_out = conv_out_size(h, kh, sh, ph, dh);
  g.w_out = conv_out_size(w, kw, sw, pw, dw);
  g.in_place = !channels_last && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  g.hph = (h + 2 * ph + sh - 1) / sh;
  g.wph = (w + 2 * pw + sw - 1) / sw;
  if (!g.in_place) g.wph = (g.wph + kRowAlignment - 1) / kRowAlignment * kRowAlignment;
  g.sample_numel = c_in * g.channel_numel();
  return g;
}

// Nonzero taps per output channel, CSR: taps of channel co are [row_ptr[co], row_ptr[co+1]).
// offset: element offset of the tap's input row start in the prepared sample.
template <typename T>
struct PackedTaps {
  std::vector<int64_t> row_ptr;
  std::vector<int64_t> offset;
  std::vector<T> value;
};

template <typename T>
PackedTaps<T> pack_taps(const T* weight, const Geometry& g) {
  PackedTaps<T> taps;
  taps.row_ptr.reserve(g.c_out + 1);
  taps.row_ptr.push_back(0);
  const int64_t cig = g.c_in_per_group();
  const int64_t plane = g.hph * g.wph;
  for (int64_t co = 0; co < g.c_out; ++co) {
    const int64_t c_base = (co / g.c_out_per_group()) * cig;
    const T* wc = weight + co * cig * g.kh * g.kw;
    for (int64_t ci = 0; ci < cig; ++ci) {
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const T v = wc[(ci * g.kh + ky) * g.kw + kx];
          if (v == T(0)) continue;
          const int64_t oy = ky * g.dh, ox = kx * g.dw;
          const int64_t phase = (oy % g.sh) * g.sw + ox % g.sw;
          const int64_t c = c_base + ci;
          taps.offset.push_back((c * g.sh * g.sw + phase) * plane + (oy / g.sh) * g.wph +
                                ox / g.sw);
          taps.value.push_back(v);
        }
      }
    }
    taps.row_ptr.push_back(static_cast<int64_t>(taps.offset.size()));
  }
  return taps;
}

// Which polyphase planes the taps read, and per column phase the range of columns that
// come from x (the rest is padding). Depends on the geometry only; computed once per call
// so that preparing a sample does no divisions per row.
struct SamplePlan {
  std::vector<char> row_phase_used;  // [sh]
  std::vector<char> col_phase_used;  // [sw]
  std::vector<int64_t> col_begin;    // [sw] first column j with source column in [0, W)
  std::vector<int64_t> col_end;      // [sw] one past the last such column
};

inline SamplePlan make_sample_plan(const Geometry& g) {
  SamplePlan plan{std::vector<char>(g.sh, 0), std::vector<char>(g.sw, 0),
                  std::vector<int64_t>(g.sw), std::vector<int64_t>(g.sw)};
  for (int64_t ky = 0; ky < g.kh; ++ky) plan.row_phase_used[(ky * g.dh) % g.sh] = 1;
  for (int64_t kx = 0; kx < g.kw; ++kx) plan.col_phase_used[(kx * g.dw) % g.sw] = 1;
  for (int64_t px = 0; px < g.sw; ++px) {
    // Source column of j is px - pw + sw j.
    const int64_t j0 = std::min(g.wph, (g.pw - px + g.sw - 1) / g.sw);
    plan.col_begin[px] = j0;
    plan.col_end[px] = std::max(j0, std::min(g.wph, (g.w + g.pw - px + g.sw - 1) / g.sw));
  }
  return plan;
}

// Writes the zero-padded, polyphase-split copy of one input sample [C_in, H, W] into dst
// (g.sample_numel elements). Phases no tap reads (e.g. 3 of 4 for a stride-2 1x1 conv)
// are skipped.
template <typename T>
void prepare_sample(const T* x, const Geometry& g, const SamplePlan& plan, T* dst) {
  const int64_t plane = g.hph * g.wph;
  // Channel-major, then source row: the sw phases of one source row are written while
  // the row is in L1.
  for (int64_t c = 0; c < g.c_in; ++c) {
    const T* xc = x + c * g.h * g.w;
    for (int64_t py = 0; py < g.sh; ++py) {
      if (!plan.row_phase_used[py]) continue;
      for (int64_t i = 0; i < g.hph; ++i) {
        const int64_t sy = py + g.sh * i - g.ph;
        const bool zero_row = sy < 0 || sy >= g.h;
        for (int64_t px = 0; px < g.sw; ++px) {
          if (!plan.col_phase_used[px]) continue;
          T* drow = dst + (c * g.sh * g.sw + py * g.sw + px) * plane + i * g.wph;
          if (zero_row) {
            std::fill(drow, drow + g.wph, T(0));
            continue;
          }
          // Column j of this phase comes from x column px - pw + sw j.
          const T* xrow = xc + sy * g.w;
          const int64_t sx0 = px - g.pw, sw = g.sw;
          const int64_t j0 = plan.col_begin[px], j1 = plan.col_end[px];
          std::fill(drow, drow + j0, T(0));
          if (sw == 1) {
            std::memcpy(drow + j0, xrow + sx0 + j0, (j1 - j0) * sizeof(T));
          } else {
            for (int64_t j = j0; j < j1; ++j) drow[j] = xrow[sx0 + sw * j];
          }
          std::fill(drow + j1, drow + g.wph, T(0));
        }
      }
    }
  }
}

// Channels-last data meet the planes of the tile loop in two transpositions: of x's
// samples into planes ([pixels, C] -> [C, pixels]) and of the output planes back. Done an
// element at a time they cost as much as the convolution itself at low density (2 ms of
// a 2.5 ms call on a 16-channel 32x32 layer, batch 128), so float data are moved in 8x8
// blocks through ymm registers.
constexpr int64_t kTransposeBlock = 8;

#if PXKERN_HAVE_AVX2_PATH

// dst[j * dst_stride + i] = src[i * src_stride + j] for i, j < 8.
PXKERN_AVX2_FN void transpose_8x8(const float* src, int64_t src_stride, float* dst,
                                  int64_t dst_stride) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int k = 0; k < 2; ++k) {
      r[i + k] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + k + 2] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  // r[0], r[1], r[2], r[3] hold columns 0 | 4, 2 | 6, 1 | 5, 3 | 7 (low | high half) of
  // rows 0-3; r[4..7] the same of rows 4-7.
  const int column_of[4] = {0, 2, 1, 3};
  for (int k = 0; k < 4; ++k) {
    const int c = column_of[k];
    _mm256_storeu_ps(dst + c * dst_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * dst_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}

#endif  // PXKERN_HAVE_AVX2_PATH

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: 8x8 blocks
// through registers for float with `vector`, single elements otherwise and at the edges.
template <typename T>
void transpose(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
               int64_t dst_stride, bool vector) {
  constexpr int64_t B = kTransposeBlock;
  int64_t rows_done = 0, cols_done = 0;
#if PXKERN_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (vector) {
      rows_done = rows - rows % B;
      cols_done = cols - cols % B;
      for (int64_t i = 0; i < rows_done; i += B)
        for (int64_t j = 0; j < cols_done; j += B)
          transpose_8x8(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
    }
  }
#endif
  (void)vector;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < rows_done ? cols_done : 0; j < cols; ++j)
      dst[j * dst_stride + i] = src[i * src_stride + j];
}

// prepare_sample for a channels-last sample [H, W, C_in]. Stride 1 (one polyphase plane
// per channel): each source row is a [W, C_in] block transposed into the channels'
// plane rows. Otherwise pixel by pixel, so that x is read contiguously and each prepared
// plane is written along its rows (reading channel by channel would take a cache line of
// x per element).
// Writes only the elements that come from x, the same ones for every sample: dst must
// hold zeros everywhere else, as the zero-initialized scratch of a call does. Zeroing the
// whole sample each time cost ~15% of a 1%-dense call on a 16-channel 32x32 layer.
template <typename T>
void prepare_sample_channels_last(const T* x, const Geometry& g, const SamplePlan& plan, T* dst,
                                  bool vector) {
  const int64_t plane = g.hph * g.wph, channel_step = g.channel_numel();
  if (g.sh == 1 && g.sw == 1) {
    for (int64_t sy = 0; sy < g.h; ++sy)
      transpose(x + sy * g.w * g.c_in, g.c_in, g.w, g.c_in,
                dst + (sy + g.ph) * g.wph + g.pw, channel_step, vector);
    return;
  }
  for (int64_t sy = 0; sy < g.h; ++sy) {
    const int64_t py = (sy + g.ph) % g.sh, i = (sy + g.ph) / g.sh;
    if (!plan.row_phase_used[py]) continue;
    for (int64_t sx = 0; sx < g.w; ++sx) {
      const int64_t px = (sx + g.pw) % g.sw, j = (sx + g.pw) / g.sw;
      if (!plan.col_phase_used[px]) continue;
      const T* src = x + (sy * g.w + sx) * g.c_in;
      T* d = dst + (py * g.sw + px) * plane + i * g.wph + j;
      for (int64_t c = 0; c < g.c_in; ++c) d[c * channel_step] = src[c];
    }
  }
}

// One output plane [h_out, w_out] of one (sample, output channel): src is the prepared
// sample, taps/values the channel's nonzero taps.
template <typename T>
struct PlaneArgs {
  const T* src;
  int64_t src_row_stride;
  const int64_t* offset;
  const T* value;
  int64_t ntaps;
  T bias;
  T* dst;
  int64_t h_out, w_out;
  // If set, every output element starts from bias + init_scale * init[oy][ox] (init is
  // [h_out, w_out]): the ones_scale term.
  const T* init = nullptr;
  T init_scale = T(0);
};

// Portable path: same tiling with plain loops (the compiler may vectorize it for the
// baseline ISA).
template <typename T>
void plane_portable(const PlaneArgs<T>& a) {
  constexpr int64_t kRows = 4, kCols = 16;
  for (int64_t oy0 = 0; oy0 < a.h_out; oy0 += kRows) {
    const int64_t rows = std::min(kRows, a.h_out - oy0);
    for (int64_t ox0 = 0; ox0 < a.w_out; ox0 += kCols) {
      const int64_t cols = std::min(kCols, a.w_out - ox0);
      T acc[kRows][kCols];
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          acc[r][c] = a.init == nullptr
                          ? a.bias
                          : a.bias + a.init_scale * a.init[(oy0 + r) * a.w_out + ox0 + c];
      const T* base = a.src + oy0 * a.src_row_stride + ox0;
      for (int64_t t = 0; t < a.ntaps; ++t) {
        const T* p = base + a.offset[t];
        const T v = a.value[t];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) acc[r][c] += v * p[r * a.src_row_stride + c];
      }
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(a.dst + (oy0 + r) * a.w_out + ox0, acc[r], cols * sizeof(T));
    }
  }
}

#if PXKERN_HAVE_AVX2_PATH

using cpu::Avx2;

// 16 ymm registers: 12 accumulators, one broadcast weight, spare for address/mask.
constexpr int kMaxAccumulators = 12;
constexpr int kMaxVectorsPerRow = 4;

// One R x V-vector register tile at (oy0, ox0); kTail: the last vector is partial and
// goes through `tail` masked loads/stores.
template <typename T, int R, int V, bool kTail>
PXKERN_AVX2_FN void tile_avx2(const PlaneArgs<T>& a, int64_t oy0, int64_t ox0, __m256i tail) {
  using S = Avx2<T>;
  constexpr int L = S::kLanes;
  typename S::Vec acc[R][V];
  const typename S::Vec b = S::set1(a.bias);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = b;
  if (a.init != nullptr) {
    const typename S::Vec s = S::set1(a.init_scale);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        const T* q = a.init + (oy0 + r) * a.w_out + ox0 + v * L;
        const typename S::Vec in = (kTail && v == V - 1) ? S::maskload(q, tail) : S::load(q);
        acc[r][v] = S::fma(s, in, acc[r][v]);
      }
    }
  }
  const int64_t rs = a.src_row_stride;
  const T* base = a.src + oy0 * rs + ox0;
  for (int64_t t = 0; t < a.ntaps; ++t) {
    const T* p = base + a.offset[t];
    const typename S::Vec w = S::set1(a.value[t]);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        const T* q = p + r * rs + v * L;
        const typename S::Vec in = (kTail && v == V - 1) ? S::maskload(q, tail) : S::load(q);
        acc[r][v] = S::fma(w, in, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    T* d = a.dst + (oy0 + r) * a.w_out + ox0;
    for (int v = 0; v < V; ++v) {
      if (kTail && v == V - 1) {
        S::maskstore(d + v * L, tail, acc[r][v]);
      } else {
        S::store(d + v * L, acc[r][v]);
      }
    }
  }
}

// Picks the instantiation with R == rows (rows <= kMaxAccumulators / V).
template <typename T, int V, bool kTail, int R = 1>
PXKERN_AVX2_FN void tile_avx2_rows(int rows, const PlaneArgs<T>& a, int64_t oy0, int64_t ox0,
                                   __m256i tail) {
  if constexpr (R * V <= kMaxAccumulators) {
    if (rows == R) {
      tile_avx2<T, R, V, kTail>(a, oy0, ox0, tail);
    } else {
      tile_avx2_rows<T, V, kTail, R + 1>(rows, a, oy0, ox0, tail);
    }
  }
}

template <typename T, int V>
PXKERN_AVX2_FN void tile_avx2_dispatch(int rows, bool has_tail, const PlaneArgs<T>& a,
                                       int64_t oy0, int64_t ox0, __m256i tail) {
  if (has_tail) {
    tile_avx2_rows<T, V, true>(rows, a, oy0, ox0, tail);
  } else {
    tile_avx2_rows<T, V, false>(rows, a, oy0, ox0, tail);
  }
}

// Several output planes of one prepared sample (all of an item's output channels), band
// by band: a band of tile rows reads (rows + kh - 1) input rows of every channel, 11 KB
// on a 16-channel 32x32 layer, which stays in L1 while every plane's tiles of that band
// run. Plane by plane instead, each output channel swept the whole sample (74 KB there)
// through L2 again: 5-10% slower on ResNet-20's layers (batch 128, densities 0.2-0.7).
template <typename T>
PXKERN_AVX2_FN void planes_avx2(const PlaneArgs<T>* planes, int64_t count) {
  const PlaneArgs<T>& a = planes[0];
  constexpr int64_t L = Avx2<T>::kLanes;
  const int64_t nvec = (a.w_out + L - 1) / L;
  const int64_t partial = a.w_out % L;
  const __m256i tail = Avx2<T>::first_lanes(static_cast<int>(partial));
  // Column blocks of at most kMaxVectorsPerRow vectors, sizes balanced (5 -> 3 + 2).
  const int64_t nblocks = (nvec + kMaxVectorsPerRow - 1) / kMaxVectorsPerRow;
  int64_t vec0 = 0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int vecs = static_cast<int>(nvec / nblocks + (blk < nvec % nblocks ? 1 : 0));
    const bool has_tail = partial != 0 && vec0 + vecs == nvec;
    const int64_t max_rows = kMaxAccumulators / vecs;
    for (int64_t oy0 = 0; oy0 < a.h_out; oy0 += max_rows) {
      const int rows = static_cast<int>(std::min(max_rows, a.h_out - oy0));
      for (int64_t p = 0; p < count; ++p) {
        switch (vecs) {
          case 1: tile_avx2_dispatch<T, 1>(rows, has_tail, planes[p], oy0, vec0 * L, tail); break;
          case 2: tile_avx2_dispatch<T, 2>(rows, has_tail, planes[p], oy0, vec0 * L, tail); break;
          case 3: tile_avx2_dispatch<T, 3>(rows, has_tail, planes[p], oy0, vec0 * L, tail); break;
          default: tile_avx2_dispatch<T, 4>(rows, has_tail, planes[p], oy0, vec0 * L, tail); break;
        }
      }
    }
    vec0 += vecs;
  }
}

#endif  // PXKERN_HAVE_AVX2_PATH

// out = bias everywhere, in out's layout (bias nullptr: zeros).
template <typename T>
void fill_bias(const T* bias, T* out, const Geometry& g) {
  const int64_t plane_out = g.h_out * g.w_out;
  if (bias == nullptr) {
    std::fill(out, out + g.n * g.c_out * plane_out, T(0));
    return;
  }
  for (int64_t n = 0; n < g.n; ++n) {
    T* sample = out + n * g.c_out * plane_out;
    if (g.channels_last) {
      for (int64_t p = 0; p < plane_out; ++p) std::copy(bias, bias + g.c_out, sample + p * g.c_out);
    } else {
      for (int64_t co = 0; co < g.c_out; ++co)
        std::fill(sample + co * plane_out, sample + (co + 1) * plane_out, bias[co]);
    }
  }
}

// Distance between the scratch output planes of a channels-last call. The transpose into
// the output reads 8 planes at once at this stride; a multiple of 4 KB (a 32x32 float
// plane) would map all 8 reads to one L1 set, so such strides get one cache line more.
template <typename T>
int64_t scratch_plane_stride(int64_t plane_out) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t rounded = (plane_out + kLine - 1) / kLine * kLine;
  return (rounded * sizeof(T)) % 4096 == 0 ? rounded + kLine : rounded;
}

// Planes [channels, plane_out] (plane_stride apart) of output channels
// [co_begin, co_begin + channels) into the channels-last sample out_sample [plane_out, c_out].
template <typename T>
void store_channels_last(const T* planes, int64_t channels, int64_t plane_stride, int64_t plane_out,
                         int64_t co_begin, int64_t c_out, T* out_sample, bool vector) {
  transpose(planes, plane_stride, channels, plane_out, out_sample + co_begin, c_out, vector);
}

// Output planes of one prepared sample through the tile code of the selected ISA.
template <typename T>
void run_planes(const PlaneArgs<T>* planes, int64_t count, bool use_avx2) {
#if PXKERN_HAVE_AVX2_PATH
  if (use_avx2) {
    planes_avx2(planes, count);
    return;
  }
#endif
  (void)use_avx2;
  for (int64_t p = 0; p < count; ++p) plane_portable(planes[p]);
}

// The ones_scale term of one prepared sample: box[h_out, w_out] = conv2d of the sample's
// channel sum with the all-ones kh x kw kernel, in the layer's geometry. channel_sum has
// the size of one channel of the sample (sh sw polyphase planes); box_taps are the
// all-ones taps of one channel (see make_box_taps).
template <typename T>
void box_of_channel_sum(const T* sample, const Geometry& g, const PackedTaps<T>& box_taps,
                        T* channel_sum, T* box, bool use_avx2) {
  const int64_t channel_numel = g.channel_numel();
  std::copy(sample, sample + channel_numel, channel_sum);
  for (int64_t c = 1; c < g.c_in; ++c) {
    const T* plane = sample + c * channel_numel;
    for (int64_t k = 0; k < channel_numel; ++k) channel_sum[k] += plane[k];
  }
  const PlaneArgs<T> box_plane{channel_sum, g.wph, box_taps.offset.data(), box_taps.value.data(),
                               static_cast<int64_t>(box_taps.offset.size()), T(0), box, g.h_out,
                               g.w_out};
  run_planes(&box_plane, 1, use_avx2);
}

// The kh x kw taps of an all-ones kernel on a one-channel sample of geometry g.
template <typename T>
PackedTaps<T> make_box_taps(const Geometry& g) {
  Geometry one = g;
  one.c_in = one.c_out = one.groups = 1;
  const std::vector<T> ones(g.kh * g.kw, T(1));
  return pack_taps(ones.data(), one);
}

// out = conv2d(x, weight + ones_scale (x) 1, bias) with geometry g, in g's layout (see
// file header). bias and ones_scale may be nullptr. num_threads <= 0 uses the OpenMP
// default.
template <typename T>
void sparse_conv2d(const T* x, const T* weight, const T* bias, const T* ones_scale, T* out,
                   const Geometry& g, Isa isa, int num_threads) {
  if (g.n == 0 || g.c_out == 0 || g.h_out <= 0 || g.w_out <= 0) return;
  const PackedTaps<T> taps = pack_taps(weight, g);
  if (taps.offset.empty() && ones_scale == nullptr) {
    fill_bias(bias, out, g);
    return;
  }
  const PackedTaps<T> box_taps = ones_scale != nullptr ? make_box_taps<T>(g) : PackedTaps<T>{};
  const SamplePlan plan = make_sample_plan(g);
  const int64_t plane_out = g.h_out * g.w_out;
  const int64_t x_sample = g.c_in * g.h * g.w;
  const bool use_avx2 = cpu::use_avx2(isa);
  const int threads = cpu::resolve_threads(num_threads);
  // Split output channels only as far as needed to give every thread a few work items,
  // so that a thread usually prepares each sample once and reuses it for all channels.
  // Dynamic scheduling: items are 10-1000 us, and a thread that is preempted (shared
  // machines) should not hold up the others.
  const int64_t co_blocks =
      std::min(g.c_out, std::max<int64_t>(1, (4 * threads + g.n - 1) / std::max<int64_t>(g.n, 1)));
  const int64_t co_per_block = (g.c_out + co_blocks - 1) / co_blocks;
  const int64_t items = g.n * co_blocks;

#pragma omp parallel num_threads(threads) if (items > 1)
  {
    // Zero-initialized: the padding of every sample prepared into it (see
    // prepare_sample_channels_last). Aligned rows load 7-27% faster than rows of the
    // plane's own width on 16- and 64-channel layers (32x32, 8x8; 32 x 16x16: no change).
    const int64_t scratch_numel = g.in_place ? 0 : g.sample_numel;
    const cpu::AlignedBuffer<T> scratch = cpu::aligned_buffer<T>(scratch_numel);
    std::fill_n(scratch.get(), scratch_numel, T(0));
    const int64_t plane_stride = scratch_plane_stride<T>(plane_out);
    std::vector<T> planes(g.channels_last ? co_per_block * plane_stride : 0);
    const cpu::AlignedBuffer<T> channel_sum =
        cpu::aligned_buffer<T>(ones_scale != nullptr ? g.channel_numel() : 0);
    std::vector<T> box(ones_scale != nullptr ? plane_out : 0);
    std::vector<PlaneArgs<T>> channel_planes(co_per_block);
    int64_t prepared = -1;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n = item / co_blocks;
      const int64_t co_begin = (item % co_blocks) * co_per_block;
      const int64_t co_end = std::min(g.c_out, co_begin + co_per_block);
      const T* src = g.in_place ? x + n * x_sample : scratch.get();
      if (prepared != n) {
        if (!g.in_place) {
          if (g.channels_last) {
            prepare_sample_channels_last(x + n * x_sample, g, plan, scratch.get(), use_avx2);
          } else {
            prepare_sample(x + n * x_sample, g, plan, scratch.get());
          }
        }
        if (ones_scale != nullptr)
          box_of_channel_sum(src, g, box_taps, channel_sum.get(), box.data(), use_avx2);
        prepared = n;
      }
      for (int64_t co = co_begin; co < co_end; ++co) {
        const int64_t t0 = taps.row_ptr[co];
        T* dst = g.channels_last ? planes.data() + (co - co_begin) * plane_stride
                                 : out + (n * g.c_out + co) * plane_out;
        channel_planes[co - co_begin] = PlaneArgs<T>{
            src, g.wph, taps.offset.data() + t0, taps.value.data() + t0,
            taps.row_ptr[co + 1] - t0, bias != nullptr ? bias[co] : T(0), dst, g.h_out, g.w_out,
            ones_scale != nullptr ? box.data() : nullptr,
            ones_scale != nullptr ? ones_scale[co] : T(0)};
      }
      // Band order pays whenever the sample was prepared into the scratch. Read in place
      // (channels-first, stride 1, no padding; no ResNet-20 layer) it lost on 28x28 and
      // 32x32 planes (1.2-1.4x slower at density 0.05, interleaved) and won on 8x8 and
      // 16x16 ones: in-place calls keep the plane-by-plane order.
      if (g.in_place) {
        for (int64_t c = 0; c < co_end - co_begin; ++c)
          run_planes(&channel_planes[c], 1, use_avx2);
      } else {
        run_planes(channel_planes.data(), co_end - co_begin, use_avx2);
      }
      if (g.channels_last)
        store_channels_last(planes.data(), co_end - co_begin, plane_stride, plane_out, co_begin, g.c_out,
                            out + n * g.c_out * plane_out, use_avx2);
    }
  }
}

}  // namespace sparse_conv2d
}  // namespace pxkern
