// ATen glue for pxkern::bsr_dense_mm and pxkern::bsr_linear on the CPU: checks arguments,
// allocates the output and calls the torch-free core in bsr_dense_mm.h.
#include "bsr_dense_mm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace pxkern {

namespace {

struct BsrShape {
  int64_t m, k, bm, bn;
};

// Checks everything but x's shape; W's sizes and block size.
BsrShape check_bsr(const char* op, const at::Tensor& values, const at::Tensor& row_offsets,
                   const at::Tensor& column_indices, at::IntArrayRef shape,
                   const at::Tensor& x) {
  TORCH_CHECK(values.device().is_cpu() && row_offsets.device().is_cpu() &&
                  column_indices.device().is_cpu() && x.device().is_cpu(),
              op, ": values, row_offsets, column_indices and x must be CPU tensors, got ",
              values.device(), ", ", row_offsets.device(), ", ", column_indices.device(), ", ",
              x.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": x dtype ", x.scalar_type(),
              " must match values dtype ", values.scalar_type());
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
              op, ": values, row_offsets, column_indices and x must be contiguous");
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

// The bias as a contiguous [m] tensor of dtype, or undefined.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t m,
                      at::ScalarType dtype) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got ", bias->device());
  TORCH_CHECK(bias->scalar_type() == dtype, op, ": bias dtype ", bias->scalar_type(),
              " must match values dtype ", dtype);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == m, op, ": bias must have shape [", m,
              "], got ", bias->sizes());
  return bias->contiguous();
}

}  // namespace

at::Tensor bsr_dense_mm_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& column_indices, at::IntArrayRef shape,
                            const at::Tensor& x, const std::optional<at::Tensor>& bias_in) {
  const char* op = "bsr_dense_mm";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [K, N], got shape ", x.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, x);
  TORCH_CHECK(x.size(0) == s.k, op, ": x has ", x.size(0), " rows but W of shape ", shape,
              " needs K = ", s.k);
  const at::Tensor bias = check_bias(op, bias_in, s.m, values.scalar_type());
  const int64_t n = x.size(1);
  at::Tensor y = at::empty({s.m, n}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_dense_mm", [&] {
    bsr_dense_mm::bsr_dense_mm<scalar_t>(
        values.const_data_ptr<scalar_t>(), row_offsets.const_data_ptr<int32_t>(),
        column_indices.const_data_ptr<int32_t>(), s.m, s.k, s.bm, s.bn,
        x.const_data_ptr<scalar_t>(), n,
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
        bsr_dense_mm::select_isa(), at::get_num_threads());
  });
  return y;
}

at::Tensor bsr_linear_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                          const at::Tensor& column_indices, at::IntArrayRef shape,
                          const at::Tensor& x, const std::optional<at::Tensor>& bias_in) {
  const char* op = "bsr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, K], got shape ", x.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, x);
  TORCH_CHECK(x.size(1) == s.k, op, ": x has ", x.size(1), " columns but W of shape ", shape,
              " needs K = ", s.k);
  const at::Tensor bias = check_bias(op, bias_in, s.m, values.scalar_type());
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, s.m}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_linear", [&] {
    bsr_dense_mm::bsr_linear<scalar_t>(
        values.const_data_ptr<scalar_t>(), row_offsets.const_data_ptr<int32_t>(),
        column_indices.const_data_ptr<int32_t>(), s.m, s.k, s.bm, s.bn,
        x.const_data_ptr<scalar_t>(), batch,
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
        bsr_dense_mm::select_isa(), at::get_num_threads());
  });
  return y;
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) {
  m.impl("bsr_dense_mm", &bsr_dense_mm_cpu);
  m.impl("bsr_linear", &bsr_linear_cpu);
}

}  // namespace pxkern
