"""The fused PX Linear layer: the three streams of one ``nn.Linear`` (with its eval
BatchNorm and ReLU) in one pass over the weight, and stream C's backward with the PX
scores in one more (px-spec.md section 6).

Stream values travel as mantissas with power-of-two exponents kept by the caller
(:mod:`pxkern.px.scaled`); the ops take the exponents as plain float multipliers. For a
layer whose inputs ``u``, ``h`` carry exponents ``e_u``, ``e_h`` and whose outputs should
carry ``f_u``, ``f_h``, the caller passes ``u_scale = 2**(e_u - f_u)``,
``u_offset_scale = 2**-f_u`` (the additive constants, in units of the output's exponent,
as :meth:`pxkern.px.scaled.ScaledArithmetic.weighted` rescales a bias), and likewise for
``h``. That is what stream B and C of :func:`pxkern.px_scores` compute per layer: B's
bias is 1, C's is ``bias**2``, BatchNorm runs on running statistics, B is gated by A's
ReLU and C has no activation.

Backends: ``"triton"`` (:mod:`pxkern.kernels.triton.px_linear`, imported when it runs)
and ``"torch"``, a plain composition of ``F.linear``; see :func:`pxkern.backend.choose_backend`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern.backend import choose_backend
from pxkern.ops.px_layer_common import (
    accumulation_dtype,
    check_backward_arguments,
    check_forward_arguments,
    without_b_peak,
)

__all__ = ["px_linear_backward", "px_linear_forward"]

_OP = "px_linear"
_BACKENDS = ("triton", "torch")


def px_linear_forward(
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
    backend: str | None = None,
    b_peak: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Streams A, B and C of one Linear layer (+ eval BatchNorm + ReLU).

    With ``P = weight * mask`` (``mask`` all ones when None):

    - A: ``a = x P^T + bias``, then ``a * scale + shift``;
    - B: ``b = (u mask^T) * u_scale + [bias given] * u_offset_scale``, then
      ``b * scale + shift * u_offset_scale``;
    - C: ``c = (h (P**2)^T) * h_scale + bias**2 * h_offset_scale``, then
      ``c * scale + shift * h_offset_scale``;
    - ``relu``: returns ``relu(a)`` and ``b * (a > 0)`` (a after the affine); C has no
      activation.

    Args:
        x: ``[N, K]`` stream A's input, float32, float16 or bfloat16.
        u: ``[N, K]`` stream B's input (a mantissa), x's dtype.
        h: ``[R, K]`` stream C's input (a mantissa; R is usually 1), float64, float32,
            float16 or bfloat16; C accumulates in float64 for float64, else float32.
        weight: ``[M, K]``, x's dtype.
        mask: ``[M, K]`` 0/1 values, bool or weight's dtype (not read for checking), or None.
        bias: ``[M]`` or None. scale, shift: ``[M]`` each, the eval BatchNorm folded per
            channel (``gamma / sqrt(var + eps)``, ``beta - mean * scale``), both or neither.
            Any floating dtype: each stream converts them to its accumulation dtype.
        relu: whether a ReLU follows (the gate of stream B).
        u_scale, u_offset_scale, h_scale, h_offset_scale: the exponent multipliers above.
        backend: ``"triton"``, ``"torch"`` or None to choose (:func:`pxkern.backend.choose_backend`).
        b_peak: False when the caller does not need ``b_amax`` (see ``without_b_peak``).

    Returns:
        ``(a, b, c, b_amax, c_amax)``: ``a, b [N, M]`` in x's dtype, ``c [R, M]`` in h's;
        ``b_amax = max|b|`` (None without ``b_peak``) and ``c_amax = max|c|`` of the
        stored values as 0-d float32 tensors (a float64 C mantissa's maximum rounds to
        float32: the caller keeps C's mantissas near 1).
    """
    check_forward_arguments(
        _OP, 2, x, u, h, weight, mask, bias, scale, shift, relu,
        {"u_scale": u_scale, "u_offset_scale": u_offset_scale, "h_scale": h_scale, "h_offset_scale": h_offset_scale},
    )
    arguments = (x, u, h, weight, mask, bias, scale, shift, relu,
                 float(u_scale), float(u_offset_scale), float(h_scale), float(h_offset_scale))
    if choose_backend(_OP, x.device, backend, implemented=_BACKENDS) == "triton":
        from pxkern.kernels.triton.px_linear import px_linear_forward_triton

        return without_b_peak(px_linear_forward_triton(*arguments), b_peak)
    return without_b_peak(_forward_torch(*arguments), b_peak)


def px_linear_backward(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Stream C's vector-Jacobian product through one Linear layer, and its PX scores.

    With ``P = weight * mask`` and ``g_pre = g * scale`` (g when scale is None):
    ``g_in = g_pre P**2`` and ``scores = |g_pre^T h| * weight**2 * mask``.

    The forward's ``h_scale`` is a factor of the layer's function: the caller passes
    ``g`` multiplied by it (with exponents held constant, as :mod:`pxkern.px.scaled`
    does), or the scores of earlier layers are off by per-layer factors.

    Args:
        g: ``[R, M]`` the cotangent at the layer's C output (after the affine),
            float64, float32, float16 or bfloat16.
        h: ``[R, K]`` stream C's input to the layer, g's dtype.
        weight: ``[M, K]`` float32, float16 or bfloat16.
        mask: ``[M, K]`` 0/1 values, bool or weight's dtype, or None (all ones).
        scale: ``[M]`` the eval BatchNorm's per-channel scale, or None.
        backend: ``"triton"``, ``"torch"`` or None to choose.

    Returns:
        ``(g_in [R, K] in h's dtype, scores [M, K])``, scores in float64 for float64 h,
        else float32.
    """
    check_backward_arguments(_OP, 2, g, h, weight, mask, scale)
    if choose_backend(_OP, g.device, backend, implemented=_BACKENDS) == "triton":
        from pxkern.kernels.triton.px_linear import px_linear_backward_triton

        return px_linear_backward_triton(g, h, weight, mask, scale)
    return _backward_torch(g, h, weight, mask, scale)


def _forward_torch(
    x: Tensor, u: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None,
    scale: Tensor | None, shift: Tensor | None, relu: bool,
    u_scale: float, u_offset_scale: float, h_scale: float, h_offset_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`px_linear_forward` in PyTorch, accumulating like the kernel: A and B in
    float32, C in its accumulation dtype."""
    c_dtype = accumulation_dtype(h.dtype)
    masked = weight if mask is None else weight * mask.to(weight.dtype)
    a = F.linear(x.float(), masked.float())
    if mask is None:
        # B's weight is all ones: every output is the row sum of u.
        b = u.float().sum(1, keepdim=True).mul(u_scale).expand(-1, weight.shape[0]).contiguous()
    else:
        b = F.linear(u.float(), mask.float()).mul(u_scale)
    c = F.linear(h.to(c_dtype), masked.to(c_dtype).square()).mul(h_scale)
    if bias is not None:
        a = a + bias.float()
        b = b + u_offset_scale
        c = c + bias.to(c_dtype).square() * h_offset_scale
    if scale is not None:
        a = a * scale.float() + shift.float()
        b = b * scale.float() + shift.float() * u_offset_scale
        c = c * scale.to(c_dtype) + shift.to(c_dtype) * h_offset_scale
    if relu:
        gate = a > 0
        a = torch.where(gate, a, 0.0)
        b = b * gate
    a, b, c = a.to(x.dtype), b.to(x.dtype), c.to(h.dtype)
    return a, b, c, b.abs().amax().float(), c.abs().amax().float()


def _backward_torch(
    g: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`px_linear_backward` in PyTorch, in C's accumulation dtype."""
    c_dtype = accumulation_dtype(h.dtype)
    masked = weight.to(c_dtype) if mask is None else weight.to(c_dtype) * mask.to(c_dtype)
    squared = masked.square()
    g_pre = g.to(c_dtype) if scale is None else g.to(c_dtype) * scale.to(c_dtype)
    g_in = (g_pre @ squared).to(h.dtype)
    scores = (g_pre.T @ h.to(c_dtype)).abs_().mul_(squared)
    return g_in, scores
