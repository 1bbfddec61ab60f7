// pxkern::plan_scores: one PX scoring of a lowered fused plan on the CPU, the whole
// program in one call (pxkern/px/program.py lowers the plan and passes the kernel
// choices it measured).
//
// The Python plan (pxkern/px/fused.py) issues the same kernel calls, but a ResNet-20
// scoring spends 13-22 ms in the Python between them: the plan's walk, the layer ops'
// argument checks, measured-choice lookups, exponents, and autograd's nodes for stream C
// (docs/prune-performance.md, "The executor's budget, measured"). Here the walk is a loop
// over instructions and C's backward an explicit reverse walk. Every step follows its
// Python counterpart named in the comments, so both paths compute the same values in the
// same order; tests/test_program.py holds them to each other.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace pxkern {

namespace {

// Opcodes and the instruction layout: pxkern/px/program.py writes them.
enum Opcode : int64_t {
  kConv = 1,             // [op, input, -1, layer]: a layer group (conv, eval BatchNorm, ReLU)
  kGate = 2,             // [op, input, residual or -1]: ReLU of input (+ residual), A gates B
  kAdd = 3,              // [op, first, second]: a sum of two values
  kAdaptiveAvgPool = 4,  // [op, input, -1, out_h, out_w]
  kFlatten = 5,          // [op, input, -1, start_dim]
  kKeptLinear = 6,       // [op, input, -1, kept]: a Linear run with its own parameters
  kMaxPool = 7,          // [op, input, -1, kh, kw, sh, sw, ph, pw]
};
constexpr int64_t kWidth = 9;  // ints per instruction
constexpr int64_t kLayerTensors = 5;  // weight, mask, bias, BatchNorm scale, shift (float64)
constexpr int64_t kKeptTensors = 3;   // weight, mask, bias
constexpr int64_t kLayerGeometry = 6;  // relu, b_peak_needed, stride h/w, padding h/w
// Per conv layer and round: pruned away, A sparse, B as the complement, B sparse,
// C sparse, backward split, backward's input-gradient convolution sparse.
constexpr int64_t kLayerChoices = 7;

using OptionalTensor = std::optional<at::Tensor>;

// One value of the model's forward in the three streams (fused.StreamValues): b and c
// are mantissas of b * 2**b_exponent and c * 2**c_exponent; c is undefined after the
// first batch.
struct Streams {
  at::Tensor a, b, c;
  int64_t b_exponent = 0, c_exponent = 0;
  std::optional<int64_t> b_peak, c_peak;
};

// What C's backward needs of a step, kept from the first batch.
struct Saved {
  at::Tensor kernel_scale;   // conv: the factors between C's input and the weight
  at::Tensor kernel_weight;  // conv: (W M)**2 in float64, undefined if pruned away
  double first_factor = 1, second_factor = 1;  // sums: the cotangent's factor per input
  int64_t c_shift = 0;                         // kept Linear: the output's normalizing shift
};

// Stream A left float32's safe range: Python scores the model on the stream path.
struct LeftTrueScale {};

double pow2(int64_t exponent) { return std::ldexp(1.0, static_cast<int>(exponent)); }

// max |t| from one read in memory order (scaled.largest_magnitude); NaN if any is NaN.
double peak_of(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  at::Tensor flat = t;
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
    flat = t.permute({0, 2, 3, 1});
  auto [low, high] = at::aminmax(flat.reshape(-1));
  const double lo = low.item<double>(), hi = high.item<double>();
  if (std::isnan(lo) || std::isnan(hi)) return std::nan("");
  return std::max(-lo, hi);
}

// scaled.magnitude_exponent of a measured peak: r with peak in [2**(r-1), 2**r).
std::optional<int64_t> exponent_of(double peak) {
  TORCH_CHECK(std::isfinite(peak), "plan_scores: a PX stream value is not finite before rescaling");
  if (peak == 0) return std::nullopt;
  int exponent;
  std::frexp(peak, &exponent);
  return exponent;
}

// fused._normalizing_shift: the peak's exponent, measured if not known; 0 for zeros.
int64_t normalizing_shift(const at::Tensor& mantissa, std::optional<int64_t> peak) {
  if (!peak) peak = exponent_of(peak_of(mantissa));
  return peak.value_or(0);
}

// streams.check_true_scale for float32.
void check_true_scale(double peak, int64_t range) {
  if (!std::isfinite(peak)) throw LeftTrueScale{};
  if (peak > 0) {
    int exponent;
    std::frexp(peak, &exponent);
    if (std::abs(exponent) > range) throw LeftTrueScale{};
  }
}

at::Tensor per_output(const at::Tensor& v) { return v.reshape({-1, 1, 1, 1}); }
at::Tensor per_channel(const at::Tensor& v) { return v.reshape({1, -1, 1, 1}); }

// px_conv2d._folded_bias: bias * factor + shift with absent terms left out.
OptionalTensor folded_bias(const OptionalTensor& bias, const OptionalTensor& factor,
                           const OptionalTensor& shift) {
  if (!bias) return shift;
  at::Tensor scaled = factor ? *bias * *factor : *bias;
  return shift ? OptionalTensor(scaled + *shift) : OptionalTensor(scaled);
}

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         const OptionalTensor& ones_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pxkern::sparse_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                         const OptionalTensor&)>();
  // As ops/sparse_conv2d.py: channels-last x as it is, any other strides channels-first.
  const at::Tensor input = x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  const int64_t unit[2] = {1, 1};
  return op.call(input, weight.contiguous(), bias, stride, padding, unit, 1, ones_scale);
}

// px_conv2d._measured_conv with the choice made: sparse_conv2d or ATen's convolution
// (oneDNN in float32) of weight + ones_scale.
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, bool sparse,
                const OptionalTensor& ones_scale = std::nullopt) {
  if (sparse) return sparse_conv2d(x, weight, bias, stride, padding, ones_scale);
  const at::Tensor dense = ones_scale ? weight + per_output(*ones_scale) : weight;
  return at::conv2d(x, dense, bias, stride, padding);
}

// pxkern::gate_streams into fresh outputs (in place when `inplace`); returns the peaks
// (max |a_in|, max |b_out|). Operands of other strides are copied to a's (the kernel
// reads all alike).
std::pair<double, double> gate_streams(at::Tensor& a, at::Tensor& b, const OptionalTensor& a_residual,
                                       const OptionalTensor& b_residual, double b_residual_scale,
                                       bool inplace) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pxkern::gate_streams", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                         const OptionalTensor&, double, bool, at::Tensor&, at::Tensor&)>();
  auto like_a = [&](const at::Tensor& t) { return t.strides() == a.strides() ? t : at::empty_like(a).copy_(t); };
  at::Tensor b_in = like_a(b);
  OptionalTensor ar = a_residual ? OptionalTensor(like_a(*a_residual)) : std::nullopt;
  OptionalTensor br = b_residual ? OptionalTensor(like_a(*b_residual)) : std::nullopt;
  at::Tensor a_out = inplace ? a : at::empty_like(a);
  at::Tensor b_out = inplace && b_in.is_same(b) ? b : at::empty_like(a);
  const at::Tensor peaks = op.call(a, b_in, ar, br, b_residual_scale, true, a_out, b_out);
  a = a_out;
  b = b_out;
  const double* p = peaks.const_data_ptr<double>();
  return {p[0], p[1]};
}

// fused._aligned: (larger, smaller, 2**(smaller's exponent - larger's), larger's exponent),
// and whether the first was the larger.
struct Aligned {
  at::Tensor larger, smaller;
  double factor;
  int64_t exponent;
  bool first_larger;
};
Aligned aligned(const at::Tensor& x, int64_t x_exponent, const at::Tensor& y, int64_t y_exponent) {
  if (x_exponent >= y_exponent) return {x, y, pow2(y_exponent - x_exponent), x_exponent, true};
  return {y, x, pow2(x_exponent - y_exponent), y_exponent, false};
}

class Program {
 public:
  Program(at::IntArrayRef program, at::IntArrayRef geometry, const std::vector<OptionalTensor>& layers,
          const std::vector<OptionalTensor>& kept, at::IntArrayRef choices, int64_t true_scale_range)
      : program_(program), geometry_(geometry), layers_(layers), kept_(kept), choices_(choices),
        range_(true_scale_range) {
    TORCH_CHECK(program.size() % kWidth == 0, "plan_scores: the program is not whole instructions");
    steps_ = static_cast<int64_t>(program.size()) / kWidth;
    layer_count_ = static_cast<int64_t>(layers.size()) / kLayerTensors;
    TORCH_CHECK(static_cast<int64_t>(geometry.size()) == layer_count_ * kLayerGeometry &&
                    static_cast<int64_t>(choices.size()) == layer_count_ * kLayerChoices,
                "plan_scores: geometry or choices do not match the layers");
  }

  // The raw scores of every conv layer, then of every kept layer; status 1 if stream A
  // left float32's safe range (nothing else is then valid).
  std::tuple<std::vector<at::Tensor>, at::Tensor> run(const std::vector<at::Tensor>& batches) {
    at::NoGradGuard no_grad;
    try {
      std::optional<at::Tensor> v_mantissa;
      int64_t v_exponent = 0;
      for (size_t i = 0; i < batches.size(); ++i) {
        const Streams& out = forward(batches[i], i == 0);
        if (i == 0)
          for (const Streams& value : values_) kernel_values_.push_back(value.c);
        check_true_scale(peak_of(out.a), range_);
        add_to_data_vector(out.b.sum(0), out.b_exponent, v_mantissa, v_exponent);
      }
      return {backward(direction(*v_mantissa)), status(0)};
    } catch (const LeftTrueScale&) {
      return {all_scores({}, {}), status(1)};
    }
  }

 private:
  const int64_t* instruction(int64_t step) const { return program_.data() + step * kWidth; }
  const OptionalTensor& layer(int64_t index, int64_t part) const { return layers_[index * kLayerTensors + part]; }
  const int64_t* layer_geometry(int64_t index) const { return geometry_.data() + index * kLayerGeometry; }
  const int64_t* layer_choices(int64_t index) const { return choices_.data() + index * kLayerChoices; }

  static at::Tensor status(int64_t code) { return at::full({1}, code, at::kLong); }

  // fused.FusedPlan.run: slot 0 is the input, step s writes slot s + 1.
  const Streams& forward(const at::Tensor& x, bool with_kernel) {
    values_.assign(steps_ + 1, Streams{});
    if (with_kernel) saved_.assign(steps_, Saved{});
    Streams& input = values_[0];
    input.a = x;
    input.b = x * x;
    if (with_kernel) input.c = at::ones(x.sizes().slice(1).vec(), x.options().dtype(at::kDouble)).unsqueeze(0);
    for (int64_t s = 0; s < steps_; ++s) {
      const int64_t* in = instruction(s);
      Saved unused;
      Saved& saved = with_kernel ? saved_[s] : unused;
      const Streams& t = values_[in[1]];
      Streams& out = values_[s + 1];
      switch (in[0]) {
        case kConv: out = conv_layer(t, in[3], saved); break;
        case kGate: out = gated(t, in[2] >= 0 ? &values_[in[2]] : nullptr, saved); break;
        case kAdd: out = sum(t, values_[in[2]], saved); break;
        case kAdaptiveAvgPool:
          out = per_stream(t, [&](const at::Tensor& v) { return at::adaptive_avg_pool2d(v, {in[3], in[4]}); });
          break;
        case kFlatten:
          out = per_stream(t, [&](const at::Tensor& v) { return at::flatten(v, in[3]); });
          break;
        case kMaxPool:
          out = per_stream(t, [&](const at::Tensor& v) {
            return at::max_pool2d(v, {in[3], in[4]}, {in[5], in[6]}, {in[7], in[8]});
          });
          break;
        case kKeptLinear: out = kept_linear(t, in[3], saved); break;
        default: TORCH_CHECK(false, "plan_scores: unknown opcode ", in[0]);
      }
    }
    return values_[steps_];
  }

  // fused._run_layer and px_conv2d._forward_cpp.
  Streams conv_layer(const Streams& t, int64_t index, Saved& saved) {
    const at::Tensor& weight = *layer(index, 0);
    const OptionalTensor& mask = layer(index, 1);
    const OptionalTensor& bias = layer(index, 2);
    const OptionalTensor& scale = layer(index, 3);
    const OptionalTensor& shift = layer(index, 4);
    const int64_t* g = layer_geometry(index);
    const bool relu = g[0], b_peak_needed = g[1];
    const int64_t stride[2] = {g[2], g[3]}, padding[2] = {g[4], g[5]};
    const int64_t* choice = layer_choices(index);
    const bool pruned_away = choice[0];

    const int64_t sb = normalizing_shift(t.b, t.b_peak);
    Streams out;
    out.b_exponent = t.b_exponent + sb;
    const double u_scale = pow2(-sb), u_offset_scale = pow2(-out.b_exponent);
    const at::Tensor masked = mask ? weight * *mask : weight;
    // A and B in float32; C takes the affine in float64 (its sums cancel).
    const OptionalTensor data_scale = scale ? OptionalTensor(scale->to(at::kFloat)) : std::nullopt;
    const OptionalTensor data_shift = shift ? OptionalTensor(shift->to(at::kFloat)) : std::nullopt;
    const OptionalTensor a_bias = folded_bias(bias, data_scale, data_shift);
    const at::Tensor b_factor = data_scale ? *data_scale * u_scale
                                           : at::full({weight.size(0)}, u_scale, weight.options());
    OptionalTensor b_offset = folded_bias(bias ? OptionalTensor(at::ones_like(b_factor)) : std::nullopt,
                                          data_scale, data_shift);
    if (b_offset) b_offset = *b_offset * u_offset_scale;

    if (t.c.defined()) {
      const int64_t sc = normalizing_shift(t.c, t.c_peak);
      out.c_exponent = t.c_exponent + sc;
      const double h_scale = pow2(-sc);
      std::tie(out.c, saved.kernel_weight) = kernel_stream(t.c, masked, bias, scale, shift, h_scale,
                                                           pow2(-out.c_exponent), stride, padding, pruned_away,
                                                           choice[4]);
      out.c_peak = exponent_of(out.c.abs().amax().item<double>());
      if (scale)
        saved.kernel_scale = *scale * h_scale;
      else if (sc != 0)
        saved.kernel_scale = at::full({weight.size(0)}, h_scale, weight.options().dtype(at::kDouble));
    }
    const int64_t out_h = (t.a.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
    const int64_t out_w = (t.a.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
    if (pruned_away) {
      std::optional<double> b_amax;
      std::tie(out.a, out.b, b_amax) = pruned_away_streams(t.a, a_bias, b_offset, relu, weight.size(0), out_h, out_w);
      if (b_peak_needed) out.b_peak = exponent_of(*b_amax);
      return out;
    }
    out.a = conv(t.a, data_scale ? masked * per_output(*data_scale) : masked, a_bias, stride, padding, choice[1]);
    out.b = mask_conv(t.b, mask, weight, b_factor, b_offset, stride, padding, choice[2], choice[3]);
    if (relu) {
      const double b_peak = gate_streams(out.a, out.b, std::nullopt, std::nullopt, 1.0, true).second;
      if (b_peak_needed) out.b_peak = exponent_of(b_peak);
    } else if (b_peak_needed) {
      out.b_peak = exponent_of(peak_of(out.b));
    }
    return out;
  }

  // px_conv2d._mask_conv: B's convolution with weight mask * factor, or its complement
  // (mask - 1) * factor plus the box filter of factor (sparse_conv2d's ones_scale).
  static at::Tensor mask_conv(const at::Tensor& u, const OptionalTensor& mask, const at::Tensor& weight,
                              const at::Tensor& factor, const OptionalTensor& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, bool complement, bool sparse) {
    if (complement || !mask) {  // no mask: all ones, whose complement is empty
      const at::Tensor rest = mask ? (mask->to(u.scalar_type()) - 1).mul_(per_output(factor))
                                   : at::zeros(weight.sizes(), u.options());
      return conv(u, rest, bias, stride, padding, sparse, factor);
    }
    return conv(u, mask->to(u.scalar_type()) * per_output(factor), bias, stride, padding, sparse);
  }

  // px_conv2d._kernel_stream_cpp: C in float64, weight masked**2 with the affine folded in;
  // and masked**2 itself, the backward's kernel weight.
  static std::pair<at::Tensor, at::Tensor> kernel_stream(const at::Tensor& h, const at::Tensor& masked,
                                                         const OptionalTensor& bias, const OptionalTensor& scale,
                                                         const OptionalTensor& shift, double h_scale,
                                                         double h_offset_scale, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, bool pruned_away, bool sparse) {
    OptionalTensor c_bias = folded_bias(bias ? OptionalTensor(bias->to(at::kDouble).square()) : std::nullopt,
                                        scale, shift);
    if (c_bias) c_bias = *c_bias * h_offset_scale;
    if (pruned_away) {
      const int64_t out_h = (h.size(2) + 2 * padding[0] - masked.size(2)) / stride[0] + 1;
      const int64_t out_w = (h.size(3) + 2 * padding[1] - masked.size(3)) / stride[1] + 1;
      at::Tensor c = at::zeros({h.size(0), masked.size(0), out_h, out_w}, h.options());
      return {c_bias ? c.add_(per_channel(*c_bias)) : c, at::Tensor()};
    }
    const at::Tensor kernel_weight = masked.to(at::kDouble).square();
    const at::Tensor scaled = scale ? kernel_weight * per_output(*scale * h_scale) : kernel_weight * h_scale;
    return {conv(h, scaled, c_bias, stride, padding, sparse), kernel_weight};
  }

  // px_conv2d._pruned_away_streams: A and B of an all-zero mask are their per-channel
  // constants, gated on the constants; and B's peak.
  static std::tuple<at::Tensor, at::Tensor, std::optional<double>> pruned_away_streams(
      const at::Tensor& x, const OptionalTensor& a_bias, const OptionalTensor& b_offset, bool relu,
      int64_t channels, int64_t out_h, int64_t out_w) {
    const at::Tensor zeros = at::zeros({channels}, x.options());
    at::Tensor a_value = a_bias ? *a_bias : zeros, b_value = b_offset ? *b_offset : zeros;
    if (relu) {
      const at::Tensor gate = a_value > 0;
      a_value = at::where(gate, a_value, 0.0);
      b_value = at::where(gate, b_value, 0.0);
    }
    const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
    const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    auto filled = [&](const at::Tensor& value) {
      at::Tensor out = at::empty({x.size(0), channels, out_h, out_w}, x.options().memory_format(layout));
      return out.copy_(per_channel(value).expand_as(out));
    };
    return {filled(a_value), filled(b_value), b_value.abs().amax().item<double>()};
  }

  // fused._gated_streams: ReLU of t (+ residual) with A's gate on B; C passes (summed).
  Streams gated(const Streams& t, const Streams* residual, Saved& saved) {
    Streams out;
    out.a = t.a;
    OptionalTensor a_residual, b_residual;
    double factor = 1;
    out.b = t.b;
    out.b_exponent = t.b_exponent;
    out.c = t.c;
    out.c_exponent = t.c_exponent;
    if (residual) {
      const Aligned b = aligned(t.b, t.b_exponent, residual->b, residual->b_exponent);
      out.b = b.larger;
      b_residual = b.smaller;
      factor = b.factor;
      out.b_exponent = b.exponent;
      a_residual = residual->a;
      if (t.c.defined()) std::tie(out.c, out.c_exponent) = kernel_sum(t, *residual, saved);
    }
    const auto [a_peak, b_peak] = gate_streams(out.a, out.b, a_residual, b_residual, factor, false);
    check_true_scale(a_peak, range_);
    out.b_peak = exponent_of(b_peak);
    if (!residual) out.c_peak = t.c_peak;
    return out;
  }

  // fused._aligned_sum.
  Streams sum(const Streams& first, const Streams& second, Saved& saved) {
    Streams out;
    out.a = first.a + second.a;
    const Aligned b = aligned(first.b, first.b_exponent, second.b, second.b_exponent);
    out.b = at::add(b.larger, b.smaller, b.factor);
    out.b_exponent = b.exponent;
    if (first.c.defined()) std::tie(out.c, out.c_exponent) = kernel_sum(first, second, saved);
    return out;
  }

  // fused._aligned_kernel_sum, remembering each input's factor for the backward.
  static std::pair<at::Tensor, int64_t> kernel_sum(const Streams& first, const Streams& second, Saved& saved) {
    const Aligned c = aligned(first.c, first.c_exponent, second.c, second.c_exponent);
    saved.first_factor = c.first_larger ? 1.0 : c.factor;
    saved.second_factor = c.first_larger ? c.factor : 1.0;
    return {at::add(c.larger, c.smaller, c.factor), c.exponent};
  }

  // fused._per_stream: a function linear in its one stream input, on every stream.
  template <typename F>
  static Streams per_stream(const Streams& t, F fn) {
    Streams out;
    out.a = fn(t.a);
    out.b = fn(t.b);
    out.b_exponent = t.b_exponent;
    if (t.c.defined()) out.c = fn(t.c);
    out.c_exponent = t.c_exponent;
    return out;
  }

  // fused._run_kept for a Linear: every stream with the layer's own (masked) parameters.
  Streams kept_linear(const Streams& t, int64_t index, Saved& saved) {
    check_true_scale(peak_of(t.a), range_);
    const at::Tensor& param = *kept_[index * kKeptTensors];
    const OptionalTensor& mask = kept_[index * kKeptTensors + 1];
    const OptionalTensor& bias = kept_[index * kKeptTensors + 2];
    const at::Tensor weight = mask ? param * *mask : param;
    Streams out;
    out.a = at::linear(t.a, weight, bias);
    // The output's mantissa, brought to [1/2, 1) by a power of two.
    auto layer = [&](const at::Tensor& x, int64_t exponent, const at::Tensor& w, int64_t& shift) {
      const OptionalTensor scaled_bias =
          bias ? OptionalTensor(bias->to(x.scalar_type()) * pow2(-exponent)) : std::nullopt;
      const at::Tensor y = at::linear(x, w, scaled_bias);
      shift = normalizing_shift(y, std::nullopt);
      return y * pow2(-shift);
    };
    int64_t shift;
    out.b = layer(t.b, t.b_exponent, weight, shift);
    out.b_exponent = t.b_exponent + shift;
    if (t.c.defined()) {
      out.c = layer(t.c, t.c_exponent, weight.to(at::kDouble), saved.c_shift);
      out.c_exponent = t.c_exponent + saved.c_shift;
    }
    return out;
  }

  // ScaledSum.add: v accumulates each batch's B output summed over the batch.
  static void add_to_data_vector(const at::Tensor& mantissa, int64_t exponent, std::optional<at::Tensor>& v,
                                 int64_t& v_exponent) {
    const at::Tensor m = mantissa.to(at::kDouble);
    if (!v) {
      v = m;
      v_exponent = exponent;
      return;
    }
    const int64_t common = std::max(v_exponent, exponent);
    v = *v * pow2(v_exponent - common) + m * pow2(exponent - common);
    v_exponent = common;
  }

  // ScaledSum.direction: v over its largest magnitude.
  static at::Tensor direction(const at::Tensor& v) {
    const double peak = v.abs().max().item<double>();
    return peak > 0 ? v / peak : v;
  }

  // Every conv layer's scores, then every kept layer's; zeros where none flowed.
  std::vector<at::Tensor> all_scores(std::vector<at::Tensor> layer_scores, std::vector<at::Tensor> kept_scores) const {
    layer_scores.resize(layer_count_);
    kept_scores.resize(kept_.size() / kKeptTensors);
    for (int64_t i = 0; i < layer_count_; ++i)
      if (!layer_scores[i].defined()) layer_scores[i] = at::zeros(layer(i, 0)->sizes(), at::kDouble);
    for (size_t i = 0; i < kept_scores.size(); ++i)
      if (!kept_scores[i].defined()) kept_scores[i] = at::zeros(kept_[i * kKeptTensors]->sizes(), at::kDouble);
    layer_scores.insert(layer_scores.end(), kept_scores.begin(), kept_scores.end());
    return layer_scores;
  }

  // C's backward from the cotangent v at the output: the reverse walk of the first
  // batch's steps, each step's vector-Jacobian product on the mantissas (the scores need
  // no per-layer correction: every layer's gradient carries the output's exponent).
  std::vector<at::Tensor> backward(const at::Tensor& v) {
    std::vector<at::Tensor> grads(steps_ + 1);
    const at::Tensor& c_out = kernel_values_[steps_];
    grads[steps_] = v.to(at::kDouble).expand_as(c_out);
    std::vector<at::Tensor> layer_scores(layer_count_);
    std::vector<at::Tensor> kept_scores(kept_.size() / kKeptTensors);
    auto flow = [&](int64_t slot, const at::Tensor& g) {
      grads[slot] = grads[slot].defined() ? grads[slot] + g : g;
    };
    for (int64_t s = steps_ - 1; s >= 0; --s) {
      const at::Tensor g = grads[s + 1];
      if (!g.defined()) continue;
      grads[s + 1] = at::Tensor();
      const int64_t* in = instruction(s);
      const Saved& saved = saved_[s];
      const at::Tensor& c_in = kernel_values_[in[1]];
      switch (in[0]) {
        case kConv: {
          auto [g_in, scores] = conv_backward(g, c_in, in[3], saved);
          layer_scores[in[3]] = scores;
          flow(in[1], g_in);
          break;
        }
        case kGate:
          if (in[2] >= 0) {
            flow(in[1], saved.first_factor == 1 ? g : g * saved.first_factor);
            flow(in[2], saved.second_factor == 1 ? g : g * saved.second_factor);
          } else {
            flow(in[1], g);
          }
          break;
        case kAdd:
          flow(in[1], saved.first_factor == 1 ? g : g * saved.first_factor);
          flow(in[2], saved.second_factor == 1 ? g : g * saved.second_factor);
          break;
        case kAdaptiveAvgPool: flow(in[1], at::_adaptive_avg_pool2d_backward(g, c_in)); break;
        case kFlatten: flow(in[1], g.reshape(c_in.sizes())); break;
        case kMaxPool: {
          const int64_t kernel[2] = {in[3], in[4]}, stride[2] = {in[5], in[6]}, padding[2] = {in[7], in[8]};
          const int64_t unit[2] = {1, 1};
          const at::Tensor indices = std::get<1>(at::max_pool2d_with_indices(c_in, kernel, stride, padding, unit));
          flow(in[1], at::max_pool2d_with_indices_backward(g, c_in, kernel, stride, padding, unit, false, indices));
          break;
        }
        case kKeptLinear: {
          const int64_t index = in[3];
          const at::Tensor& param = *kept_[index * kKeptTensors];
          const OptionalTensor& mask = kept_[index * kKeptTensors + 1];
          const at::Tensor w = param.to(at::kDouble);
          const at::Tensor leaf = mask ? w * *mask : w;
          const at::Tensor g_out = g * pow2(-saved.c_shift);
          at::Tensor scores = g_out.t().mm(c_in).abs_().mul_(w).mul_(w);
          kept_scores[index] = mask ? scores.mul_(*mask) : scores;
          flow(in[1], g_out.mm(leaf));
          break;
        }
      }
    }
    return all_scores(std::move(layer_scores), std::move(kept_scores));
  }

  // px_conv2d._backward_cpp: C's input gradient and the layer's scores |G| W**2 M, with
  // W**2 M = (W M)**2, the kernel weight the forward kept.
  std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& g, const at::Tensor& h, int64_t index,
                                                  const Saved& saved) const {
    const at::Tensor& weight = *layer(index, 0);
    const int64_t* geometry = layer_geometry(index);
    const int64_t stride[2] = {geometry[2], geometry[3]}, padding[2] = {geometry[4], geometry[5]};
    const int64_t* choice = layer_choices(index);
    if (choice[0]) return {at::zeros_like(h), at::zeros(weight.sizes(), h.options())};
    const at::Tensor& kernel_weight = saved.kernel_weight;
    const at::Tensor& kernel_scale = saved.kernel_scale;
    const at::Tensor g_pre = kernel_scale.defined() ? g * per_channel(kernel_scale) : g;
    const int64_t unit[2] = {1, 1}, none[2] = {0, 0};
    auto gradients = [&](bool input_gradient) {
      return at::convolution_backward(g_pre, h, kernel_weight, std::nullopt, stride, padding, unit, false, none,
                                      1, {input_gradient, true, false});
    };
    at::Tensor g_in, grad_path;
    if (choice[5]) {
      // conv_transpose with stride 1 is the convolution padded by k - 1 - p.
      const int64_t full_padding[2] = {weight.size(2) - 1 - padding[0], weight.size(3) - 1 - padding[1]};
      const at::Tensor flipped = kernel_weight.transpose(0, 1).flip({2, 3});
      g_in = conv(g_pre, flipped, std::nullopt, unit, full_padding, choice[6]);
      grad_path = std::get<1>(gradients(false));
    } else {
      std::tie(g_in, grad_path, std::ignore) = gradients(true);
    }
    return {g_in, grad_path.abs_().mul_(kernel_weight)};
  }

  at::IntArrayRef program_, geometry_;
  const std::vector<OptionalTensor>& layers_;
  const std::vector<OptionalTensor>& kept_;
  at::IntArrayRef choices_;
  int64_t range_;
  int64_t steps_, layer_count_;
  std::vector<Streams> values_;
  std::vector<at::Tensor> kernel_values_;  // C's value in each slot, of the first batch
  std::vector<Saved> saved_;
};

std::tuple<std::vector<at::Tensor>, at::Tensor> plan_scores_cpu(
    const std::vector<at::Tensor>& batches, at::IntArrayRef program, at::IntArrayRef geometry,
    const std::vector<OptionalTensor>& layers, const std::vector<OptionalTensor>& kept,
    at::IntArrayRef choices, int64_t true_scale_range) {
  TORCH_CHECK(!batches.empty(), "plan_scores: no batches");
  for (const at::Tensor& x : batches)
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "plan_scores: batches must be float32 CPU tensors, got ", x.scalar_type(), " on ", x.device());
  return Program(program, geometry, layers, kept, choices, true_scale_range).run(batches);
}

}  // namespace

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("plan_scores", &plan_scores_cpu); }

}  // namespace pxkern
