"""The fused PX Conv2d layer: streams A, B and C through one convolution in one pass over
its weight and mask, and stream C's backward with the layer's PX score (px-spec.md
section 6; the interface is shared with :mod:`pxkern.ops.px_linear`).

Forward, with ``W*M`` the masked weight and ``conv`` the convolution of the layer's
geometry (groups=1, dilation=1, zero padding):

- A: ``a = conv(x, W*M) + bias``, then ``a = a*scale + shift`` (eval BatchNorm folded);
- B: ``b = conv(u, M) * u_scale + [bias given] * u_offset_scale``, then
  ``b = b*scale + shift*u_offset_scale``;
- C: ``c = conv(h, (W*M)^2) * h_scale + bias^2 * h_offset_scale``, then
  ``c = c*scale + shift*h_offset_scale``;
- ``relu``: ``a, b = relu(a), b * 1[a > 0]`` (A's sign after the affine gates B); C is linear.

B's weight is the mask (all ones without one) and its bias 1; C's weight ``(W*M)^2`` and
its bias ``bias^2``. The caller carries B and C as mantissas times power-of-two exponents
(:mod:`pxkern.px.scaled`): for inputs ``u``, ``h`` with exponents ``e_u``, ``e_h`` and
outputs to carry ``f_u``, ``f_h``, it passes ``u_scale = 2**(e_u - f_u)`` and
``u_offset_scale = 2**-f_u`` (the additive constants in units of the output's exponent,
as :meth:`pxkern.px.scaled.ScaledArithmetic.weighted` rescales a bias), likewise for h.
That is how :mod:`pxkern.px.streams` evaluates a convolution, its eval BatchNorm and
ReLU in streams B and C; not covered: a layer in ``keep`` (B would use ``W*M``),
LeakyReLU (A's output is not ``relu(a)``) and BatchNorm on batch statistics.

Backward (stream C only), with the cotangent ``g`` at C's output (after the affine) and
``g_pre = g * scale``: ``g_in = conv_transpose(g_pre, (W*M)^2)`` and
``scores = |G| * W^2 * M`` with ``G`` the weight-gradient correlation of ``g_pre`` and
``h`` summed over rows and positions (``G = dR/dP`` for ``P = (W*M)^2``, spec section 3).

Backends: ``"triton"`` (:mod:`pxkern.kernels.triton.px_conv2d`, implicit-GEMM kernels;
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cpp"`` (CPU float32 A and
B: pxkern's CPU kernels, see :func:`_forward_cpp`; other dtypes take ``"torch"``) and
``"torch"`` (``F.conv2d`` / ``F.conv_transpose2d`` / ``torch.nn.grad.conv2d_weight``). All
accept any memory format; the Triton kernels are laid out for channels-last and return
channels-last outputs. No autograd formula: the backward is explicit.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern.backend import choose_backend
from pxkern.ops.gate_streams import gate_streams
from pxkern.ops.px_layer_common import (
    accumulation_dtype,
    check_backward_arguments,
    check_forward_arguments,
    without_b_peak,
)
from pxkern.ops.measured_choice import density_level, known_choice, second_is_faster
from pxkern.ops.sparse_conv2d import (
    MAX_SPARSE_DENSITY,
    known_sparse_choice,
    prefer_sparse_conv2d,
    sparse_conv2d,
    with_ones_scale,
)

__all__ = [
    "known_backward_choices", "known_forward_choices", "measure_forward_choices", "px_conv2d_backward",
    "px_conv2d_forward",
]

_OP = "px_conv2d"


def _pair(name: str, value: int | Sequence[int], minimum: int) -> list[int]:
    """``value`` (an int or a pair of ints) as ``[h, w]``, both at least ``minimum``."""
    pair = [value, value] if isinstance(value, int) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints, got {value!r}")
    pair = list(pair)
    if min(pair) < minimum:
        raise ValueError(f"{_OP}: {name} must be >= {minimum}, got {value!r}")
    return pair


def _check_geometry(
    weight: Tensor,
    spatial: Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
) -> tuple[list[int], list[int], tuple[int, int]]:
    """Returns ``(stride, padding, (Ho, Wo))`` as pairs; unsupported geometry raises
    NotImplementedError."""
    if groups != 1:
        raise NotImplementedError(
            f"{_OP}: groups={groups} is not supported (groups=1 only); the PyTorch path "
            f"(pxkern.px.streams) handles grouped convolutions"
        )
    if _pair("dilation", dilation, 1) != [1, 1]:
        raise NotImplementedError(
            f"{_OP}: dilation={dilation!r} is not supported (dilation=1 only); the PyTorch "
            f"path (pxkern.px.streams) handles dilated convolutions"
        )
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    kernel = weight.shape[2:]
    out = tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(spatial, kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(
            f"{_OP}: kernel {tuple(kernel)} with padding {padding} does not fit the input "
            f"{tuple(spatial)} (output size {out})"
        )
    return stride, padding, out


def px_conv2d_forward(
    x: Tensor,
    u: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    *,
    relu: bool,
    u_scale: float = 1.0,
    u_offset_scale: float = 1.0,
    h_scale: float = 1.0,
    h_offset_scale: float = 1.0,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    backend: str | None = None,
    b_peak: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Streams A, B and C of one Conv2d layer (+ eval BatchNorm + ReLU); see the module
    docstring for the math.

    Args:
        x: stream A's input ``[N, Cin, H, W]``, float32, float16 or bfloat16.
        u: stream B's input (mantissa), like ``x``.
        h: stream C's input (mantissa) ``[R, Cin, H, W]``, R usually 1; float64,
            float32, float16 or bfloat16 (accumulated in float64 for float64, else float32).
        weight: ``[Cout, Cin, kh, kw]`` in x's dtype.
        mask: like ``weight``, bool or weight's dtype with 0/1 values; None = all ones.
        bias: ``[Cout]`` or None.
        scale, shift: ``[Cout]`` eval BatchNorm folded (``gamma/sqrt(var+eps)``,
            ``beta - mean*scale``), both or neither.
        relu: gate A and B by ``A > 0`` (after the affine).
        u_scale, h_scale: multipliers of B's and C's products.
        u_offset_scale, h_offset_scale: units of B's and C's additive constants.
        stride, padding: int or ``(h, w)``; zero padding.
        dilation, groups: must be 1 (else NotImplementedError).
        backend: ``"triton"``, ``"cpp"``, ``"torch"`` or None (see
            :func:`pxkern.backend.choose_backend`).
        b_peak: False when the caller does not need ``b_amax`` (see ``without_b_peak``).

    Returns:
        ``(a, b, c, b_amax, c_amax)``: a, b ``[N, Cout, Ho, Wo]`` in x's dtype, c
        ``[R, Cout, Ho, Wo]`` in h's dtype, and the 0-d ``max|b|`` in float32 (None
        without ``b_peak``) and ``max|c|`` in C's accumulation dtype (float64 for float64
        h: a float64 C mantissa may leave float32's range), both of the stored values.
    """
    multipliers = {
        "u_scale": u_scale, "u_offset_scale": u_offset_scale, "h_scale": h_scale, "h_offset_scale": h_offset_scale,
    }
    check_forward_arguments(_OP, 4, x, u, h, weight, mask, bias, scale, shift, relu, multipliers)
    stride, padding, out_size = _check_geometry(weight, x.shape[2:], stride, padding, dilation, groups)
    chosen = choose_backend(_OP, x.device, backend, implemented=("cpp", "triton", "torch"))
    if chosen == "triton":
        # Imported when it runs: ``import pxkern`` needs no Triton, and the interpreter
        # setting is read when the kernels are defined.
        from pxkern.kernels.triton.px_conv2d import px_conv2d_forward_triton

        outputs = px_conv2d_forward_triton(
            x, u, h, weight, mask, bias, scale, shift, relu,
            float(u_scale), float(u_offset_scale), float(h_scale), float(h_offset_scale), stride, padding,
        )
    elif chosen == "cpp" and x.dtype == torch.float32:
        outputs = _forward_cpp(x, u, h, weight, mask, bias, scale, shift, relu, multipliers, stride, padding,
                               out_size, b_peak)
    else:
        outputs = _forward_torch(x, u, h, weight, mask, bias, scale, shift, relu, multipliers, stride, padding)
    return without_b_peak(outputs, b_peak)


def _per_output(vector: Tensor) -> Tensor:
    """A ``[Cout]`` factor as the shape that scales a ``[Cout, Cin, kh, kw]`` weight."""
    return vector.reshape(-1, 1, 1, 1)


def _folded_bias(bias: Tensor | None, factor: Tensor | None, shift: Tensor | None) -> Tensor | None:
    """``bias * factor + shift`` with absent terms left out; None if both are absent."""
    if bias is None:
        return shift
    scaled = bias if factor is None else bias * factor
    return scaled if shift is None else scaled + shift


def _measured_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                   density: float, ones_scale: Tensor | None = None) -> Tensor:
    """A convolution of one stream on whichever of ATen's (oneDNN in float32) and
    ``sparse_conv2d`` measured faster for this weight's sparsity (``density``, the mask's:
    the streams' weights share its zeros). With ``ones_scale`` the convolution of
    ``weight + ones_scale`` (see ``sparse_conv2d``), ``density`` that of ``weight``."""
    if prefer_sparse_conv2d(x, weight, stride, padding, 1, 1, density, ones_scale):
        return sparse_conv2d(x, weight, bias, stride, padding, ones_scale=ones_scale)
    return F.conv2d(x, with_ones_scale(weight, ones_scale), bias, stride, padding)


def _b_as_complement(density: float) -> bool:
    """Whether stream B runs a mask of ``density`` as its complement (see :func:`_mask_conv`)."""
    return density > 1 - MAX_SPARSE_DENSITY


def _mask_conv(u: Tensor, mask: Tensor | None, weight_shape: torch.Size, factor: Tensor, bias: Tensor | None,
               stride: list[int], padding: list[int], density: float) -> Tensor:
    """Stream B's convolution, of weight ``mask * factor`` (``factor`` per output channel;
    no mask: all ones). A mask mostly of ones has a mostly-zero complement:
    ``conv(u, M f) = conv(u, (M - 1) f + f)``, which ``sparse_conv2d`` runs on the
    nonzeros of ``(M - 1) f`` plus one box filter of u's channel sum (its ``ones_scale``),
    when that measured faster than the dense convolution: 0.8-1.9 against 2.8 ms on
    ResNet-20's 16-channel 32x32 layers at B=128 and the masks of a prune's first 30
    rounds (0.98-0.78 dense). ``(M - 1) f`` is exact, and the complement's sum is within
    float32 rounding of the dense one for masks at least half ones."""
    if _b_as_complement(density):
        complement = (torch.zeros(weight_shape, dtype=u.dtype, device=u.device) if mask is None
                      else (mask.to(u.dtype) - 1).mul_(_per_output(factor)))
        return _measured_conv(u, complement, bias, stride, padding, 1 - density, factor)
    return _measured_conv(u, mask.to(u.dtype) * _per_output(factor), bias, stride, padding, density)


def _box_filtered_channel_sum(u: Tensor, kernel: Sequence[int], stride: list[int], padding: list[int]) -> Tensor:
    """``conv(u, ones)`` for an all-ones weight (no mask): every output channel is the same
    box filter of the channel sum, computed once as ``[N, 1, Ho, Wo]``."""
    box = torch.ones((1, 1, *kernel), dtype=u.dtype, device=u.device)
    return F.conv2d(u.sum(1, keepdim=True), box, None, stride, padding)


def _peak(t: Tensor) -> Tensor:
    """``max |t|`` as a 0-d float32 tensor, from one read of ``t`` in memory order."""
    flat = t.permute(0, 2, 3, 1) if t.is_contiguous(memory_format=torch.channels_last) else t
    low, high = torch.aminmax(flat.reshape(-1))
    return torch.maximum(-low, high).float()


def _forward_cpp(
    x: Tensor, u: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None,
    scale: Tensor | None, shift: Tensor | None, relu: bool, multipliers: dict[str, float],
    stride: list[int], padding: list[int], out_size: tuple[int, int], b_peak: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """The forward on the CPU, float32 A and B: each stream is one convolution whose
    weight and bias carry the BatchNorm and the stream's multipliers (A and B on oneDNN or
    ``sparse_conv2d``, C in its accumulation dtype), then A's ReLU, B's gate and B's peak
    in one pass (``pxkern::gate_streams``); without a ReLU, B's peak takes a pass of its
    own, skipped without ``b_peak``. Folding the per-channel factors into the
    weights rounds differently from multiplying after the convolution, by float32
    rounding. A pruned-away layer (all-zero mask; late in a global prune, most of a
    ResNet's deep layers) is its per-channel constants in every stream, gated on the
    constants: no convolution and no pass but the filling."""
    masked = weight if mask is None else weight * mask
    density = 1.0 if mask is None else mask.count_nonzero().item() / mask.numel()
    # A and B in x's dtype; C takes the affine in its own (float64: its sums cancel).
    data_scale, data_shift = (None, None) if scale is None else (scale.to(x.dtype), shift.to(x.dtype))
    a_bias = _folded_bias(bias, data_scale, data_shift)
    b_factor = (torch.full((weight.shape[0],), multipliers["u_scale"], dtype=x.dtype, device=x.device)
                if scale is None else data_scale * multipliers["u_scale"])
    b_offset = _folded_bias(None if bias is None else torch.ones_like(b_factor), data_scale, data_shift)
    b_offset = None if b_offset is None else b_offset * multipliers["u_offset_scale"]
    c = _kernel_stream_cpp(h, masked, bias, scale, shift, multipliers, stride, padding, out_size, density)
    if density == 0:
        a, b, b_amax = _pruned_away_streams(x, a_bias, b_offset, relu, (weight.shape[0], *out_size))
        return a, b, c.to(h.dtype), b_amax, c.abs().amax()
    a = _measured_conv(x, masked if scale is None else masked * _per_output(data_scale), a_bias, stride, padding,
                   density)
    b = _mask_conv(u, mask, weight.shape, b_factor, b_offset, stride, padding, density)
    if relu:
        a, b, _, gated_peak = gate_streams(a, b, relu=True, inplace=True)
        b_amax = torch.tensor(gated_peak, dtype=torch.float32)
    else:
        b_amax = _peak(b) if b_peak else None
    return a, b, c.to(h.dtype), b_amax, c.abs().amax()


def _kernel_stream_cpp(
    h: Tensor, masked: Tensor, bias: Tensor | None, scale: Tensor | None, shift: Tensor | None,
    multipliers: dict[str, float], stride: list[int], padding: list[int], out_size: tuple[int, int],
    density: float,
) -> Tensor:
    """Stream C of :func:`_forward_cpp` in its accumulation dtype: one convolution with
    weight ``masked**2`` and the affine folded in, or the constant of a pruned-away layer."""
    c_dtype = accumulation_dtype(h.dtype)
    c_scale = multipliers["h_scale"] if scale is None else scale.to(c_dtype) * multipliers["h_scale"]
    c_bias = _folded_bias(None if bias is None else bias.to(c_dtype).square(),
                          None if scale is None else scale.to(c_dtype),
                          None if shift is None else shift.to(c_dtype))
    c_bias = None if c_bias is None else c_bias * multipliers["h_offset_scale"]
    if density == 0:
        c = torch.zeros((h.shape[0], masked.shape[0], *out_size), dtype=c_dtype, device=h.device)
        return c if c_bias is None else c.add_(c_bias.reshape(1, -1, 1, 1))
    kernel_weight = masked.to(c_dtype).square()
    kernel_weight = kernel_weight * (_per_output(c_scale) if scale is not None else c_scale)
    return _measured_conv(h.to(c_dtype), kernel_weight, c_bias, stride, padding, density)


def _pruned_away_streams(
    x: Tensor, a_bias: Tensor | None, b_offset: Tensor | None, relu: bool, out_shape: tuple[int, int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """A and B ``[N, *out_shape]`` of a layer with an all-zero mask, filled in x's layout:
    the per-channel constants (zero without a bias or BatchNorm), with the ReLU and gate
    applied to the constants; and B's peak."""
    zeros = x.new_zeros(out_shape[0])
    a_value = a_bias if a_bias is not None else zeros
    b_value = b_offset if b_offset is not None else zeros
    if relu:
        gate = a_value > 0
        a_value, b_value = torch.where(gate, a_value, 0.0), torch.where(gate, b_value, 0.0)
    # The layout F.conv2d and sparse_conv2d give x's.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def filled(value: Tensor) -> Tensor:
        out = torch.empty((x.shape[0], *out_shape), dtype=x.dtype, device=x.device, memory_format=layout)
        return out.copy_(value.reshape(1, -1, 1, 1).expand_as(out))

    return filled(a_value), filled(b_value), b_value.abs().amax().float()


def _per_channel(vector: Tensor, dtype: torch.dtype) -> Tensor:
    return vector.to(dtype).reshape(1, -1, 1, 1)


def _forward_torch(
    x: Tensor, u: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None,
    scale: Tensor | None, shift: Tensor | None, relu: bool, multipliers: dict[str, float],
    stride: list[int], padding: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward composed of PyTorch ops, in the kernels' precision: A and B computed
    in float32, C in its accumulation dtype, outputs rounded once to their dtype."""
    ab_dtype, c_dtype = torch.float32, accumulation_dtype(h.dtype)
    w = weight.to(ab_dtype)
    m = None if mask is None else mask.to(ab_dtype)
    wm = w if m is None else w * m
    a = F.conv2d(x.to(ab_dtype), wm, None if bias is None else bias.to(ab_dtype), stride, padding)
    if m is None:
        b = _box_filtered_channel_sum(u.to(ab_dtype), weight.shape[2:], stride, padding).expand_as(a)
    else:
        b = F.conv2d(u.to(ab_dtype), m, None, stride, padding)
    b = b * multipliers["u_scale"]
    wm_c = wm.to(c_dtype)
    c = F.conv2d(h.to(c_dtype), wm_c * wm_c, None, stride, padding) * multipliers["h_scale"]
    u_offset, h_offset = multipliers["u_offset_scale"], multipliers["h_offset_scale"]
    if bias is not None:
        b = b + u_offset
        c = c + _per_channel(bias, c_dtype).square() * h_offset
    if scale is not None:
        a = a * _per_channel(scale, ab_dtype) + _per_channel(shift, ab_dtype)
        b = b * _per_channel(scale, ab_dtype) + _per_channel(shift, ab_dtype) * u_offset
        c = c * _per_channel(scale, c_dtype) + _per_channel(shift, c_dtype) * h_offset
    if relu:
        gate = a > 0
        a = a * gate
        b = b * gate
    a, b, c = a.to(x.dtype), b.to(x.dtype), c.to(h.dtype)
    return a, b, c, b.abs().amax().float(), c.abs().amax().to(c_dtype)


def px_conv2d_backward(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Stream C's vector-Jacobian product through one Conv2d layer and its PX score.

    The forward's ``h_scale`` is a factor of the layer's function: the caller passes
    ``g`` multiplied by it (exponents held constant, as :mod:`pxkern.px.scaled` does),
    or the scores of earlier layers are off by per-layer factors.

    Args:
        g: cotangent at C's output (after the affine) ``[R, Cout, Ho, Wo]``; float64,
            float32, float16 or bfloat16.
        h: C's input to the layer ``[R, Cin, H, W]``, g's dtype.
        weight: ``[Cout, Cin, kh, kw]``, float32, float16 or bfloat16.
        mask: like ``weight``, bool or weight's dtype; None = all ones.
        scale: ``[Cout]`` eval BatchNorm scale of the forward, or None.
        stride, padding, dilation, groups: the forward's geometry.
        backend: ``"triton"``, ``"torch"`` or None.

    Returns:
        ``(g_in, scores)``: g_in ``[R, Cin, H, W]`` in h's dtype; scores
        ``[Cout, Cin, kh, kw]`` in float64 for float64 h, else float32.
    """
    check_backward_arguments(_OP, 4, g, h, weight, mask, scale)
    stride, padding, out = _check_geometry(weight, h.shape[2:], stride, padding, dilation, groups)
    if tuple(g.shape[2:]) != out:
        raise ValueError(
            f"{_OP}: g must be [R, Cout, {out[0]}, {out[1]}] (the output of h {tuple(h.shape)} "
            f"under stride {stride} and padding {padding}), got {tuple(g.shape)}"
        )
    chosen = choose_backend(_OP, g.device, backend, implemented=("cpp", "triton", "torch"))
    if chosen == "triton":
        from pxkern.kernels.triton.px_conv2d import px_conv2d_backward_triton

        return px_conv2d_backward_triton(g, h, weight, mask, scale, stride, padding)
    if chosen == "cpp":
        return _backward_cpp(g, h, weight, mask, scale, stride, padding)
    return _backward_torch(g, h, weight, mask, scale, stride, padding)


def _backward_cpp(
    g: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, scale: Tensor | None,
    stride: list[int], padding: list[int],
) -> tuple[Tensor, Tensor]:
    """The backward on the CPU, the scores' products in place. Both gradients come from
    ATen's ``convolution_backward``, or for stride 1, if that measured faster, only the
    weight gradient: the input gradient is then a convolution of the cotangent with the
    flipped, transposed weight on the measured faster kernel. ATen's own input gradient
    (a GEMM and col2im) is most of a one-sample float64 backward on 16-channel 32x32
    layers: the split took 235-290 us against 565-570 us; on 64-channel 8x8 layers it
    loses (566-582 against 260-281 us). Nothing flows through a pruned-away layer
    (all-zero mask) and its scores are masked to zero."""
    dtype = accumulation_dtype(h.dtype)
    density = 1.0 if mask is None else mask.count_nonzero().item() / mask.numel()
    if density == 0:
        return torch.zeros_like(h), torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    w = weight.to(dtype)
    masked = w if mask is None else w * mask
    kernel_weight = masked * masked
    g_pre = g.to(dtype) if scale is None else g.to(dtype) * _per_channel(scale, dtype)
    h_acc = h.to(dtype)

    def gradients(input_gradient: bool) -> tuple[Tensor | None, Tensor]:
        g_in, grad_path, _ = torch.ops.aten.convolution_backward(
            g_pre, h_acc, kernel_weight, None, stride, padding, [1, 1], False, [0, 0], 1,
            [input_gradient, True, False],
        )
        return g_in, grad_path

    # conv_transpose with stride 1 is the convolution padded by k - 1 - p.
    full_padding = _full_padding(weight.shape, padding)
    if list(stride) == [1, 1] and min(full_padding) >= 0:
        def split() -> tuple[Tensor, Tensor]:
            flipped = kernel_weight.transpose(0, 1).flip(2, 3)
            return _measured_conv(g_pre, flipped, None, [1, 1], full_padding, density), gradients(False)[1]

        # ATen's time does not depend on the density; the split's convolution skips zeros.
        split_faster = second_is_faster(_split_key(g_pre, h_acc, weight.shape, padding), lambda: gradients(True),
                                        split, level=density_level(density))
        g_in, grad_path = split() if split_faster else gradients(True)
    else:
        g_in, grad_path = gradients(True)
    # |G| W**2 M, with W**2 M = (W M)**2 (M is 0/1): the kernel weight.
    scores = grad_path.abs_().mul_(kernel_weight)
    return g_in.to(h.dtype), scores


def _full_padding(weight_shape: Sequence[int], padding: Sequence[int]) -> list[int]:
    """The padding of the convolution that equals conv_transpose with stride 1."""
    return [k - 1 - p for k, p in zip(weight_shape[2:], padding)]


def _split_key(g_pre: Tensor, h: Tensor, weight_shape: Sequence[int], padding: Sequence[int]) -> tuple:
    """The configuration :func:`_backward_cpp` measures the split in (meta tensors will do)."""
    return ("px_conv2d_backward", tuple(g_pre.shape), g_pre.is_contiguous(), tuple(h.shape), h.is_contiguous(),
            tuple(weight_shape), tuple(padding), h.dtype, torch.get_num_threads())


def _forward_choices(x: Tensor, h: Tensor, density: float,
                     sparse: Callable[[Tensor, bool, float], bool | None]) -> tuple[bool, bool, bool, bool] | None:
    """The kernels :func:`_forward_cpp` runs for inputs like ``x`` (A's, B's) and ``h``
    (C's) and a mask of ``density`` (0 < density <= 1): A sparse, B as the mask's
    complement, B sparse, C sparse; ``sparse(input, complement, density)`` says whether a
    convolution of ``input`` with a weight of the mask's zeros (of its complement's, with
    ``ones_scale``) runs sparse, None if unknown. None if any is unknown."""
    complement = _b_as_complement(density)
    a_sparse = sparse(x, False, density)
    b_sparse = sparse(x, True, 1 - density) if complement else a_sparse
    choices = (a_sparse, complement, b_sparse, sparse(h, False, density))
    return None if None in choices else choices


def known_forward_choices(x: Tensor, h: Tensor, weight_shape: Sequence[int], stride: list[int],
                          padding: list[int], density: float) -> tuple[bool, bool, bool, bool] | None:
    """:func:`_forward_choices` as measured so far (meta tensors will do for ``x``, ``h``)."""
    def known(t: Tensor, complement: bool, d: float) -> bool | None:
        return known_sparse_choice(t, weight_shape, stride, padding, d, with_ones_scale=complement)

    return _forward_choices(x, h, density, known)


def measure_forward_choices(x: Tensor, h: Tensor, mask: Tensor, stride: list[int], padding: list[int],
                            density: float) -> None:
    """Measures :func:`_forward_choices` not measured yet, on ``x`` and ``h`` (zeros will
    do: the kernels' times do not depend on the values) and weights with ``mask``'s zeros:
    the streams' weights share them."""
    def measured(t: Tensor, complement: bool, d: float) -> bool:
        pattern = mask.to(t.dtype)
        if not complement:
            return prefer_sparse_conv2d(t, pattern, stride, padding, 1, 1, d)
        ones = torch.ones(mask.shape[0], dtype=t.dtype, device=t.device)
        return prefer_sparse_conv2d(t, pattern - 1, stride, padding, 1, 1, d, ones)

    _forward_choices(x, h, density, measured)


def known_backward_choices(g: Tensor, h: Tensor, weight_shape: Sequence[int], stride: list[int],
                           padding: list[int], density: float) -> tuple[bool, bool] | None:
    """The kernels :func:`_backward_cpp` would run for a cotangent like ``g`` and input
    like ``h`` (float64) and a mask of ``density`` (> 0), if measured: whether it splits
    the input gradient off, and whether that convolution runs sparse; None where it would
    time."""
    full_padding = _full_padding(weight_shape, padding)
    if list(stride) != [1, 1] or min(full_padding) < 0:
        return False, False
    split = known_choice(_split_key(g, h, weight_shape, padding), density_level(density))
    if not split:
        return None if split is None else (False, False)
    flipped_shape = (weight_shape[1], weight_shape[0], *weight_shape[2:])
    sparse = known_sparse_choice(g, flipped_shape, [1, 1], full_padding, density)
    return None if sparse is None else (True, sparse)


def _backward_torch(
    g: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, scale: Tensor | None,
    stride: list[int], padding: list[int],
) -> tuple[Tensor, Tensor]:
    """The backward composed of PyTorch ops in C's accumulation dtype."""
    dtype = accumulation_dtype(h.dtype)
    w = weight.to(dtype)
    m = None if mask is None else mask.to(dtype)
    wm = w if m is None else w * m
    g_pre = g.to(dtype)
    if scale is not None:
        g_pre = g_pre * _per_channel(scale, dtype)
    # With stride > 1 several input sizes give the same output size: pin H x W.
    kernel = weight.shape[2:]
    output_padding = [
        size - ((out - 1) * s - 2 * p + k)
        for size, out, s, p, k in zip(h.shape[2:], g.shape[2:], stride, padding, kernel)
    ]
    g_in = F.conv_transpose2d(g_pre, wm * wm, None, stride, padding, output_padding)
    grad_path = torch.nn.grad.conv2d_weight(h.to(dtype), weight.shape, g_pre, stride, padding)
    scores = grad_path.abs() * w * w
    if m is not None:
        scores = scores * m
    return g_in.to(h.dtype), scores
