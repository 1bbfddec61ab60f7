// ATen glue for pxkern::bsr_dense_mm and pxkern::bsr_linear on the CPU: checks arguments,
// allocates the output and calls the torch-free core in bsr_dense_mm.h.
#include "bsr_dense_mm.h"
#include "check_bsr.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

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

// Which product: y [M, N] = W x for x [K, N], or y [B, M] = x W^T for x [B, K].
enum class Layout { kDenseMm, kLinear };

// values with every block transposed ([nnz_blocks, bn, bm]) as the caller keeps them, or
// undefined.
at::Tensor check_transposed_blocks(const std::optional<at::Tensor>& blocks,
                                   const at::Tensor& values) {
  if (!blocks.has_value()) return {};
  const char* op = "bsr_linear";
  TORCH_CHECK(blocks->device().is_cpu() && blocks->scalar_type() == values.scalar_type(), op,
              ": transposed_blocks must be a CPU tensor of dtype ", values.scalar_type(),
              ", got ", blocks->scalar_type(), " on ", blocks->device());
  TORCH_CHECK(blocks->dim() == 3 && blocks->size(0) == values.size(0) &&
                  blocks->size(1) == values.size(2) && blocks->size(2) == values.size(1),
              op, ": transposed_blocks must have shape [nnz_blocks, bn, bm] = [",
              values.size(0), ", ", values.size(2), ", ", values.size(1), "], got ",
              blocks->sizes());
  TORCH_CHECK(blocks->is_contiguous(), op, ": transposed_blocks must be contiguous");
  return *blocks;
}

// Either op: checks the arguments, allocates y and runs the core.
template <Layout kLayout>
at::Tensor bsr_product_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                           const at::Tensor& column_indices, at::IntArrayRef shape,
                           const at::Tensor& x, const std::optional<at::Tensor>& bias_in,
                           bool square_weight, const at::Tensor& transposed_blocks) {
  constexpr bool mm = kLayout == Layout::kDenseMm;
  const char* op = mm ? "bsr_dense_mm" : "bsr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D ", mm ? "[K, N]" : "[B, K]", ", got shape ",
              x.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, x, "x");
  const int64_t x_k = x.size(mm ? 0 : 1), other = x.size(mm ? 1 : 0);
  TORCH_CHECK(x_k == s.k, op, ": x has ", x_k, mm ? " rows" : " columns", " but W of shape ",
              shape, " needs K = ", s.k);
  const at::Tensor bias = check_bias(op, bias_in, s.m, values.scalar_type());
  const std::vector<int64_t> y_shape = mm ? std::vector<int64_t>{s.m, other}
                                           : std::vector<int64_t>{other, s.m};
  at::Tensor y = at::empty(y_shape, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_product", [&] {
    const auto args = std::make_tuple(
        values.const_data_ptr<scalar_t>(), row_offsets.const_data_ptr<int32_t>(),
        column_indices.const_data_ptr<int32_t>(), s.m, s.k, s.bm, s.bn,
        x.const_data_ptr<scalar_t>(), other,
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), square_weight, bsr_dense_mm::select_isa(),
        static_cast<int>(at::get_num_threads()));
    if constexpr (mm) {
      std::apply(bsr_dense_mm::bsr_dense_mm<scalar_t>, args);
    } else {
      const scalar_t* blocks =
          transposed_blocks.defined() ? transposed_blocks.const_data_ptr<scalar_t>() : nullptr;
      std::apply(bsr_dense_mm::bsr_linear<scalar_t>, std::tuple_cat(args, std::make_tuple(blocks)));
    }
  });
  return y;
}

at::Tensor bsr_dense_mm_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& column_indices, at::IntArrayRef shape,
                            const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            bool square_weight) {
  return bsr_product_cpu<Layout::kDenseMm>(values, row_offsets, column_indices, shape, x, bias,
                                           square_weight, at::Tensor());
}

at::Tensor bsr_linear_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                          const at::Tensor& column_indices, at::IntArrayRef shape,
                          const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          bool square_weight,
                          const std::optional<at::Tensor>& transposed_blocks) {
  return bsr_product_cpu<Layout::kLinear>(values, row_offsets, column_indices, shape, x, bias,
                                          square_weight,
                                          check_transposed_blocks(transposed_blocks, values));
}

}  // namespace

TORCH_LIBRARY_IMPL(pxkern, CPU, m) {
  m.impl("bsr_dense_mm", &bsr_dense_mm_cpu);
  m.impl("bsr_linear", &bsr_linear_cpu);
}

}  // namespace pxkern
