// Defines the schema of every pxkern op, once. Backend implementations register against
// these names with TORCH_LIBRARY_IMPL next to their kernels (csrc/cpu/<op>/<op>.cpp);
// fake (meta) implementations live in pxkern/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

// `import pxkern._C` loads this library, which runs the registrations below. The module
// itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pxkern, m) {
  m.def(
      "sparse_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor? ones_scale=None) -> Tensor");
  m.def(
      "bsr_dense_mm(Tensor values, Tensor row_offsets, Tensor column_indices, int[2] shape, "
      "Tensor x, Tensor? bias, bool square_weight=False) -> Tensor");
  m.def(
      "bsr_linear(Tensor values, Tensor row_offsets, Tensor column_indices, int[2] shape, "
      "Tensor x, Tensor? bias, bool square_weight=False, Tensor? transposed_blocks=None) "
      "-> Tensor");
  m.def("reuse_cpu_memory(bool enable) -> ()");
  m.def(
      "keep_top(Tensor[] scores, Tensor[] masks, float density, bool per_tensor, bool keep_ties) "
      "-> (Tensor[], Tensor)");
  m.def("relu_gate(Tensor x, float negative_slope, Tensor(a!) y) -> (Tensor, Tensor)");
  m.def(
      "gate_streams(Tensor a, Tensor b, Tensor? a_residual, Tensor? b_residual, "
      "float b_residual_scale, bool relu, Tensor(a!) a_out, Tensor(b!) b_out) -> Tensor");
  m.def(
      "plan_scores(Tensor[] batches, int[] program, int[] geometry, Tensor?[] layers, "
      "Tensor?[] kept, int[] choices, int true_scale_range) -> (Tensor[], Tensor)");
  m.def(
      "bsr_px_scores(Tensor values, Tensor row_offsets, Tensor column_indices, int[2] shape, "
      "Tensor grad_out, Tensor inputs) -> Tensor");
}
