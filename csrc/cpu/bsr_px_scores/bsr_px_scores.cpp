// ATen glue for pxkern::bsr_px_scores on the CPU: checks arguments, allocates the scores and
// calls the torch-free core in bsr_px_scores.h.
#include "bsr_px_scores.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../bsr_dense_mm/check_bsr.h"

namespace pxkern {

at::Tensor bsr_px_scores_cpu(const at::Tensor& values, const at::Tensor& row_offsets,
                             const at::Tensor& column_indices, at::IntArrayRef shape,
                             const at::Tensor& grad_out, const at::Tensor& inputs) {
  const char* op = "bsr_px_scores";
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [B, M], got shape ",
              grad_out.sizes());
  TORCH_CHECK(inputs.dim() == 2, op, ": inputs must be 2-D [B, K], got shape ", inputs.sizes());
  const BsrShape s = check_bsr(op, values, row_offsets, column_indices, shape, inputs, "inputs");
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": grad_out must be a CPU tensor, got ",
              grad_out.device());
  TORCH_CHECK(grad_out.scalar_type() == values.scalar_type(), op, ": grad_out dtype ",
              grad_out.scalar_type(), " must match values dtype ", values.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out must be contiguous");
  TORCH_CHECK(inputs.size(1) == s.k, op, ": inputs has ", inputs.size(1),
              " columns but W of shape ", shape, " needs K = ", s.k);
  TORCH_CHECK(grad_out.size(1) == s.m, op, ": grad_out has ", grad_out.size(1),
              " columns but W of shape ", shape, " needs M = ", s.m);
  TORCH_CHECK(grad_out.size(0) == inputs.size(0), op, ": grad_out and inputs must have the same ",
              "number of rows B, got ", grad_out.size(0), " and ", inputs.size(0));
  at::Tensor scores = at::empty_like(values);
  if (scores.numel() == 0) return scores;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_px_scores", [&] {
    bsr_px_scores::bsr_px_scores<scalar_t>(
        values.const_data_ptr<scalar_t>(), row_offsets.const_data_ptr<int32_t>(),
        column_indices.const_data_ptr<int32_t>(), s.m, s.k, s.bm, s.bn,
        grad_out.const_data_ptr<scalar_t>(), inputs.const_data_ptr<scalar_t>(), inputs.size(0),
        scores.mutable_data_ptr<scalar_t>(), bsr_px_scores::select_isa(), at::get_num_threads());
  });
  return scores;
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("bsr_px_scores", &bsr_px_scores_cpu); }

}  // namespace pxkern
