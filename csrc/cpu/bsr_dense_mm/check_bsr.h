// ATen-side argument checks shared by the glue of the BSR ops (bsr_dense_mm.cpp,
// ../bsr_px_scores/bsr_px_scores.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "bsr_dense_mm.h"

namespace pxkern {

struct BsrShape {
  int64_t m, k, bm, bn;
};

// Checks W's BSR fields and structure and the device, dtype and contiguity of the dense
// operand x (called x_name in messages), not its shape; returns W's sizes and block size.
inline BsrShape check_bsr(const char* op, const at::Tensor& values,
                          const at::Tensor& row_offsets, const at::Tensor& column_indices,
                          at::IntArrayRef shape, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(values.device().is_cpu() && row_offsets.device().is_cpu() &&
                  column_indices.device().is_cpu() && x.device().is_cpu(),
              op, ": values, row_offsets, column_indices and ", x_name,
              " must be CPU tensors, got ",
              values.device(), ", ", row_offsets.device(), ", ", column_indices.device(), ", ",
              x.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": ", x_name, " dtype ",
              x.scalar_type(), " must match values dtype ", values.scalar_type());
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt && column_indices.scalar_type() == at::kInt,
              op, ": row_offsets and column_indices must be int32, got ",
              row_offsets.scalar_type(), " and ", column_indices.scalar_type());
  TORCH_CHECK(values.dim() == 3, op, ": values must be 3-D [nnz_blocks, bm, bn], got shape ",
              values.sizes());
  TORCH_CHECK(row_offsets.dim() == 1 && column_indices.dim() == 1, op,
              ": row_offsets and column_indices must be 1-D, got shapes ", row_offsets.sizes(),
              " and ", column_indices.sizes());
  TORCH_CHECK(values.is_contiguous() && row_offsets.is_contiguous() &&
                  column_indices.is_contiguous() && x.is_contiguous(),
              op, ": values, row_offsets, column_indices and ", x_name, " must be contiguous");
  TORCH_CHECK(shape.size() == 2, op, ": shape must be [M, K], got ", shape);
  const int64_t m = shape[0], k = shape[1];
  const int64_t nnz = values.size(0), bm = values.size(1), bn = values.size(2);
  TORCH_CHECK(m >= 0 && k >= 0, op, ": shape must be non-negative, got ", shape);
  TORCH_CHECK(bm > 0 && bn > 0, op, ": block size must be positive, got ", bm, "x", bn,
              " (values shape ", values.sizes(), ")");
  TORCH_CHECK(m % bm == 0 && k % bn == 0, op, ": block size ", bm, "x", bn,
              " does not divide shape ", shape);
  TORCH_CHECK(column_indices.size(0) == nnz, op, ": column_indices has ",
              column_indices.size(0), " entries but values has ", nnz, " blocks");
  TORCH_CHECK(row_offsets.size(0) == m / bm + 1, op, ": row_offsets must have M / bm + 1 = ",
              m / bm + 1, " entries, got ", row_offsets.size(0));
  const std::string problem = bsr_dense_mm::check_structure(
      row_offsets.const_data_ptr<int32_t>(), column_indices.const_data_ptr<int32_t>(), m / bm,
      k / bn, nnz);
  TORCH_CHECK(problem.empty(), op, ": ", problem);
  return {m, k, bm, bn};
}

}  // namespace pxkern
