// ATen glue for pxkern::relu_gate on the CPU: checks arguments, allocates the gate in x's
// layout and calls the torch-free core in relu_gate.h.
#include "relu_gate.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

namespace pxkern {

namespace {

template <typename T>
double run(const at::Tensor& x, double slope, at::Tensor& y, at::Tensor& gate) {
  return relu_gate::relu_gate<T>(x.const_data_ptr<T>(), x.numel(), static_cast<T>(slope),
                                 y.mutable_data_ptr<T>(), gate.mutable_data_ptr<T>(),
                                 relu_gate::select_isa(), at::get_num_threads());
}

}  // namespace

// y (written; may be x itself, for an in-place ReLU) and the returned gate take the
// layout of x, which must be dense (contiguous or channels-last): the core walks memory in
// order. The peak comes back as a 0-d tensor of x's dtype.
std::tuple<at::Tensor, at::Tensor> relu_gate_cpu(const at::Tensor& x, double slope, at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "relu_gate: x and y must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "relu_gate: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "relu_gate: x must be dense, got strides ",
              x.strides());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.sizes() == x.sizes() &&
                  y.strides() == x.strides(),
              "relu_gate: y must match x in dtype, shape and strides");
  at::Tensor gate = at::empty_like(x);
  const double peak = x.scalar_type() == at::kFloat ? run<float>(x, slope, y, gate)
                                                     : run<double>(x, slope, y, gate);
  return {gate, at::scalar_tensor(peak, x.options())};
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("relu_gate", &relu_gate_cpu); }

}  // namespace pxkern
