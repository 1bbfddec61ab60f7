"""ReLU / LeakyReLU with its gate and its input's peak magnitude: ``pxkern::relu_gate``.

PX stream A applies the model's activation and records the gate ``1[input > 0]`` for
stream B; it also checks the input's largest magnitude to know whether it may stay in true
scale (:mod:`pxkern.px.streams`). PyTorch takes three passes over the activation for the
three (``leaky_relu``, ``sign``, ``aminmax``); the C++ kernel takes one.

Backends (:func:`pxkern.backend.choose_backend`): ``"cpp"`` for CPU float32 and float64
tensors when the extension is built, ``"torch"`` otherwise. Forward only (no gradient).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import choose_backend

__all__ = ["relu_gate"]

_CPP_DTYPES = (torch.float32, torch.float64)


def relu_gate(x: Tensor, negative_slope: float = 0.0, inplace: bool = False) -> tuple[Tensor, Tensor, float]:
    """``(y, gate, peak)`` with ``y = F.leaky_relu(x, negative_slope)`` (in ``x`` itself if
    ``inplace``), ``gate = (x > 0)`` in ``x``'s dtype and layout, and ``peak = max |x|``
    (``inf`` if ``x`` holds inf or NaN; 0 for an empty ``x``)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"relu_gate: x must be a floating-point Tensor, got {x!r:.80}")
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    backend = choose_backend("relu_gate", x.device, implemented=("cpp", "torch"))
    # The kernel walks x in memory order; a strided x to be changed in place takes PyTorch.
    if backend == "cpp" and x.dtype in _CPP_DTYPES and x.numel() > 0 and (dense or not inplace):
        source = x if dense else x.contiguous()
        y = source if inplace else torch.empty_like(source)
        gate, peak = torch.ops.pxkern.relu_gate(source, float(negative_slope), y)
        return y, gate, float(peak)
    gate = (x > 0).to(x.dtype)
    peak = float(x.abs().max()) if x.numel() else 0.0
    y = F.leaky_relu(x, negative_slope, inplace)
    return y, gate, peak if math.isfinite(peak) else math.inf


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::relu_gate")
    def _relu_gate_fake(x: Tensor, negative_slope: float, y: Tensor) -> tuple[Tensor, Tensor]:
        torch._check(y.shape == x.shape and y.dtype == x.dtype, lambda: "relu_gate: y must match x")
        return torch.empty_like(x), x.new_empty(())
