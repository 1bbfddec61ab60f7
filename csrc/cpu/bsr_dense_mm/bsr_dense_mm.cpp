// ATen glue for pxkern::bsr_dense_mm and pxkern::bsr_linear on the CPU: checks arguments,
// allocates the output and calls the torch-free core in bsr_dense_mm.h.
#include "bsr_dense_mm.h"
#include "check_bsr.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace pxkern {

namespace {

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
                            const at::Tensor& x, const std::optional<at::Tensor>& bias_in,
                            bool square_weight) {
  const char* op = "bsr_dense_mm";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [K, N], got shape ", x.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, x, "x");
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
        square_weight, bsr_dense_mm::select_isa(), at::get_num_threads());
  });
  return y;
}

at::Tensor bsr_linear_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                          const at::Tensor& column_indices, at::IntArrayRef shape,
                          const at::Tensor& x, const std::optional<at::Tensor>& bias_in,
                          bool square_weight) {
  const char* op = "bsr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, K], got shape ", x.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, x, "x");
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
        square_weight, bsr_dense_mm::select_isa(), at::get_num_threads());
  });
  return y;
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) {
  m.impl("bsr_dense_mm", &bsr_dense_mm_cpu);
  m.impl("bsr_linear", &bsr_linear_cpu);
}

}  // namespace pxkern
