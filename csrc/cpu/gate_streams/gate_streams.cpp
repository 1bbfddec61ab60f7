// ATen glue for pxkern::gate_streams on the CPU: checks arguments and calls the
// torch-free core in gate_streams.h.
#include "gate_streams.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace pxkern {

namespace {

void check_like(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gate_streams: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == a.scalar_type() && t.sizes() == a.sizes() &&
                  t.strides() == a.strides(),
              "gate_streams: ", name, " must match a in dtype, shape and strides (got ",
              t.scalar_type(), " ", t.sizes(), " strides ", t.strides(), ")");
}

template <typename T>
at::Tensor run(const at::Tensor& a, const at::Tensor& b, const at::Tensor* a_residual,
               const at::Tensor* b_residual, double b_residual_scale, bool relu,
               at::Tensor& a_out, at::Tensor& b_out) {
  const gate_streams::Arrays<T> arrays{
      a.const_data_ptr<T>(),
      b.const_data_ptr<T>(),
      a_residual ? a_residual->const_data_ptr<T>() : nullptr,
      b_residual ? b_residual->const_data_ptr<T>() : nullptr,
      static_cast<T>(b_residual_scale),
      a_out.mutable_data_ptr<T>(),
      b_out.mutable_data_ptr<T>()};
  const auto peaks = gate_streams::gate_streams<T>(arrays, a.numel(), relu,
                                                   gate_streams::select_isa(),
                                                   at::get_num_threads());
  at::Tensor result = at::empty({2}, a.options().dtype(at::kDouble));
  result[0] = static_cast<double>(peaks.a);
  result[1] = static_cast<double>(peaks.b);
  return result;
}

}  // namespace

// Every tensor has a's dtype, shape and strides, which must be dense (contiguous or
// channels-last): the core walks memory in order. Returns [peak_a, peak_b] as float64.
at::Tensor gate_streams_cpu(const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& a_residual,
                            const c10::optional<at::Tensor>& b_residual,
                            double b_residual_scale, bool relu, at::Tensor& a_out,
                            at::Tensor& b_out) {
  TORCH_CHECK(a.device().is_cpu(), "gate_streams: a must be a CPU tensor");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "gate_streams: a must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.is_non_overlapping_and_dense(), "gate_streams: a must be dense, got strides ",
              a.strides());
  TORCH_CHECK(a_residual.has_value() == b_residual.has_value(),
              "gate_streams: give both residuals or neither");
  check_like(b, a, "b");
  check_like(a_out, a, "a_out");
  check_like(b_out, a, "b_out");
  if (a_residual.has_value()) {
    check_like(*a_residual, a, "a_residual");
    check_like(*b_residual, a, "b_residual");
  }
  const at::Tensor* ar = a_residual.has_value() ? &*a_residual : nullptr;
  const at::Tensor* br = b_residual.has_value() ? &*b_residual : nullptr;
  return a.scalar_type() == at::kFloat
             ? run<float>(a, b, ar, br, b_residual_scale, relu, a_out, b_out)
             : run<double>(a, b, ar, br, b_residual_scale, relu, a_out, b_out);
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("gate_streams", &gate_streams_cpu); }

}  // namespace pxkern
