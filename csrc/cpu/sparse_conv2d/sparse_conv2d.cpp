// ATen glue for pxkern::sparse_conv2d on the CPU: checks arguments, allocates the output
// and calls the torch-free core in sparse_conv2d.h.
#include "sparse_conv2d.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace pxkern {

namespace {

std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, "sparse_conv2d: ", name, " must have 2 elements, got ", v.size());
  return {v[0], v[1]};
}

// A [C_out] vector argument (bias, ones_scale) checked and made contiguous; undefined if absent.
at::Tensor per_channel_arg(const std::optional<at::Tensor>& v, const char* name, int64_t c_out,
                           at::ScalarType dtype) {
  if (!v.has_value()) return at::Tensor();
  TORCH_CHECK(v->device().is_cpu(), "sparse_conv2d: ", name, " must be a CPU tensor");
  TORCH_CHECK(v->scalar_type() == dtype, "sparse_conv2d: ", name, " dtype ", v->scalar_type(),
              " must match x dtype ", dtype);
  TORCH_CHECK(v->dim() == 1 && v->size(0) == c_out, "sparse_conv2d: ", name,
              " must have shape [", c_out, "], got ", v->sizes());
  return v->contiguous();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
         const at::Tensor& ones_scale, at::Tensor& out, const sparse_conv2d::Geometry& g) {
  sparse_conv2d::sparse_conv2d<T>(x.const_data_ptr<T>(), weight.const_data_ptr<T>(),
                                  data_or_null<T>(bias), data_or_null<T>(ones_scale),
                                  out.mutable_data_ptr<T>(), g, sparse_conv2d::select_isa(),
                                  at::get_num_threads());
}

}  // namespace

at::Tensor sparse_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             const std::optional<at::Tensor>& ones_scale_in) {
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(),
              "sparse_conv2d: x and weight must be CPU tensors, got ", x_in.device(), " and ",
              weight_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "sparse_conv2d: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(),
              "sparse_conv2d: weight dtype ", weight_in.scalar_type(),
              " must match x dtype ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 4, "sparse_conv2d: x must be 4-D [N, C_in, H, W], got shape ",
              x_in.sizes());
  TORCH_CHECK(weight_in.dim() == 4,
              "sparse_conv2d: weight must be 4-D [C_out, C_in/groups, kh, kw], got shape ",
              weight_in.sizes());
  TORCH_CHECK(groups > 0, "sparse_conv2d: groups must be positive, got ", groups);
  const auto [sh, sw] = pair_arg(stride, "stride");
  const auto [ph, pw] = pair_arg(padding, "padding");
  const auto [dh, dw] = pair_arg(dilation, "dilation");
  TORCH_CHECK(sh > 0 && sw > 0, "sparse_conv2d: stride must be positive, got ", stride);
  TORCH_CHECK(ph >= 0 && pw >= 0, "sparse_conv2d: padding must be non-negative, got ", padding);
  TORCH_CHECK(dh > 0 && dw > 0, "sparse_conv2d: dilation must be positive, got ", dilation);

  const int64_t c_in = x_in.size(1), c_out = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) * groups == c_in, "sparse_conv2d: x has ", c_in,
              " channels but weight of shape ", weight_in.sizes(), " with groups=", groups,
              " expects ", weight_in.size(1) * groups);
  TORCH_CHECK(c_out % groups == 0, "sparse_conv2d: out channels ", c_out,
              " must be divisible by groups=", groups);

  // Channels-last x (and not also channels-first, as for 1x1 images) is read as it is and
  // answered in the same layout: a channels-first result would send every later op (and
  // oneDNN's convolution) of a channels-last network down its slower paths.
  const bool channels_last =
      x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = per_channel_arg(bias_in, "bias", c_out, x.scalar_type());
  const at::Tensor ones_scale = per_channel_arg(ones_scale_in, "ones_scale", c_out, x.scalar_type());
  // The ones_scale term is a box filter of the sum over all input channels.
  TORCH_CHECK(!ones_scale.defined() || groups == 1,
              "sparse_conv2d: ones_scale needs groups=1, got groups=", groups);

  const sparse_conv2d::Geometry g = sparse_conv2d::make_geometry(
      x.size(0), c_in, x.size(2), x.size(3), c_out, weight.size(2), weight.size(3), groups, sh,
      sw, ph, pw, dh, dw, channels_last);
  TORCH_CHECK(g.h_out > 0 && g.w_out > 0, "sparse_conv2d: dilated kernel ", weight.sizes(),
              " (dilation ", dilation, ") does not fit the padded input ", x.sizes(),
              " (padding ", padding, ")");

  at::Tensor out = at::empty(
      {g.n, c_out, g.h_out, g.w_out},
      x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, weight, bias, ones_scale, out, g);
  } else {
    run<double>(x, weight, bias, ones_scale, out, g);
  }
  return out;
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("sparse_conv2d", &sparse_conv2d_cpu); }

}  // namespace pxkern
