"""Streams A and B at a ReLU of the fused plan, with the residual add before it:
``pxkern::gate_streams``.

With ``a_in = a + a_residual`` and ``b_in = b + b_residual_scale * b_residual`` (the
residuals optional), stream A continues with ``relu(a_in)`` and stream B with ``b_in``
gated by ``a_in > 0`` (px-spec.md section 2); without ``relu`` both pass through. The
fused plan (:mod:`pxkern.px.fused`) also needs ``max |a_in|`` (A stays in float32's safe
range) and ``max |b_out|`` (B's next normalizing exponent). PyTorch takes up to six passes
for all this; the C++ kernel one.

Backends (:func:`pxkern.backend.choose_backend`): ``"cpp"`` for CPU float32 and float64
tensors of one dense layout when the extension is built, ``"torch"`` otherwise. Forward
only (no gradient).
"""

import math

import torch
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import choose_backend

__all__ = ["gate_streams"]

_CPP_DTYPES = (torch.float32, torch.float64)


def gate_streams(
    a: Tensor,
    b: Tensor,
    a_residual: Tensor | None = None,
    b_residual: Tensor | None = None,
    b_residual_scale: float = 1.0,
    *,
    relu: bool = True,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, float, float]:
    """``(a_out, b_out, peak_a, peak_b)`` as in the module docstring; ``peak_a`` is
    ``max |a_in|`` and ``peak_b`` ``max |b_out|``, both ``inf`` if any value of ``a_in``
    or ``b_in`` is inf or NaN, 0 for empty tensors. With ``inplace`` the outputs are
    written into ``a`` and ``b``.

    All tensors must share one shape and floating dtype.
    """
    tensors = {"a": a, "b": b, "a_residual": a_residual, "b_residual": b_residual}
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"gate_streams: {name} must be a floating-point Tensor, got {t!r:.80}")
        if t.shape != a.shape or t.dtype != a.dtype or t.device != a.device:
            raise ValueError(
                f"gate_streams: {name} ({tuple(t.shape)}, {t.dtype}, {t.device}) must match a "
                f"({tuple(a.shape)}, {a.dtype}, {a.device})"
            )
    if (a_residual is None) != (b_residual is None):
        raise ValueError("gate_streams: give both residuals or neither")
    if a.numel() == 0:
        return a, b, 0.0, 0.0
    backend = choose_backend("gate_streams", a.device, implemented=("cpp", "torch"))
    strides = a.stride()
    dense = a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))
    same_layout = dense and all(t.stride() == strides for t in given.values())
    if backend == "cpp" and a.dtype in _CPP_DTYPES and same_layout:
        a_out = a if inplace else torch.empty_like(a)
        b_out = b if inplace else torch.empty_like(b)
        peaks = torch.ops.pxkern.gate_streams(a, b, a_residual, b_residual, float(b_residual_scale),
                                              bool(relu), a_out, b_out)
        peak_a, peak_b = peaks.tolist()
        return a_out, b_out, peak_a, peak_b
    return _gate_streams_torch(a, b, a_residual, b_residual, b_residual_scale, relu, inplace)


def _gate_streams_torch(a, b, a_residual, b_residual, b_residual_scale, relu, inplace):
    if a_residual is not None:
        a_in = a.add_(a_residual) if inplace else a + a_residual
        b_in = b.add_(b_residual, alpha=b_residual_scale) if inplace else b.add(b_residual, alpha=b_residual_scale)
    else:
        a_in, b_in = (a, b) if inplace else (a.clone(), b.clone())
    finite = bool(torch.isfinite(a_in).all()) and bool(torch.isfinite(b_in).all())
    peak_a = float(a_in.abs().max())
    if relu:
        gate = a_in > 0
        b_in.mul_(gate)
        a_in.mul_(gate)
    peak_b = float(b_in.abs().max())
    if not finite:
        peak_a = peak_b = math.inf
    return a_in, b_in, peak_a, peak_b


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::gate_streams")
    def _gate_streams_fake(a, b, a_residual, b_residual, b_residual_scale, relu, a_out, b_out):
        return a.new_empty((2,), dtype=torch.float64)
