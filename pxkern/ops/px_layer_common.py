"""Argument checks and the output convention shared by the fused PX layer ops
(``px_linear``, ``px_conv2d``).

Both ops take the same arguments apart from the layer's geometry (see their modules):
forward ``(x, u, h, weight, mask, bias, scale, shift, relu, u_scale, u_offset_scale,
h_scale, h_offset_scale, b_peak)`` and backward ``(g, h, weight, mask, scale)``, with tensors
laid out like the layer's own (``dim`` = 2 for Linear ``[rows, features]``, 4 for Conv2d
``[rows, channels, height, width]``; dimension 1 holds the features/channels, the
weight is ``[out, in, ...]``). The checks here cover everything but the geometry, which
each op checks itself.
"""

import math

import torch
from torch import Tensor

__all__ = [
    "DATA_DTYPES",
    "KERNEL_STREAM_DTYPES",
    "accumulation_dtype",
    "check_backward_arguments",
    "check_forward_arguments",
    "without_b_peak",
]

# Streams A and B (x, u) and the layer's weight.
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Stream C (h and its cotangent g): the CPU path runs it in float64 (streams.KERNEL_DTYPE).
KERNEL_STREAM_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and epilogues run in for inputs of ``dtype``: float64 for float64,
    float32 otherwise (the scores of the backward come out in it too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_tensor(op: str, name: str, value: object, dim: int, dtypes: tuple[torch.dtype, ...],
                  device: torch.device) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be one of {_names(dtypes)}, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device}, expected {device} like the other inputs")
    if value.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(value.shape)})")


def _check_mask(op: str, mask: Tensor | None, weight: Tensor) -> None:
    """``mask``: None, or shaped like ``weight``, bool or ``weight``'s dtype. Its values
    are not read here (that would cost a pass and a device sync); 0/1 is the caller's
    contract."""
    if mask is None:
        return
    _check_tensor(op, "mask", mask, weight.dim(), (torch.bool, weight.dtype), weight.device)
    if mask.shape != weight.shape:
        raise ValueError(f"{op}: mask must be shaped like weight {tuple(weight.shape)}, got {tuple(mask.shape)}")


def _check_channel_vector(op: str, name: str, value: Tensor | None, channels: int, device: torch.device) -> None:
    """bias/scale/shift: None or ``[channels]`` of any floating dtype; each stream converts
    it to its own accumulation dtype."""
    if value is None:
        return
    _check_tensor(op, name, value, 1, KERNEL_STREAM_DTYPES, device)
    if value.shape != (channels,):
        raise ValueError(f"{op}: {name} must have shape [{channels}] (one per output), got {tuple(value.shape)}")


def _check_affine(op: str, scale: Tensor | None, shift: Tensor | None, channels: int, device: torch.device) -> None:
    if (scale is None) != (shift is None):
        raise ValueError(
            f"{op}: scale and shift are the eval BatchNorm folded per channel: give both or "
            f"neither (got scale {'None' if scale is None else 'a tensor'}, shift "
            f"{'None' if shift is None else 'a tensor'})"
        )
    _check_channel_vector(op, "scale", scale, channels, device)
    _check_channel_vector(op, "shift", shift, channels, device)


def _check_multipliers(op: str, multipliers: dict[str, float]) -> None:
    for name, value in multipliers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be finite, got {value!r}")


def check_forward_arguments(
    op: str,
    dim: int,
    x: Tensor,
    u: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    relu: bool,
    multipliers: dict[str, float],
) -> None:
    """Checks the forward's arguments except the layer geometry: x and u alike in
    :data:`DATA_DTYPES`, h in :data:`KERNEL_STREAM_DTYPES` with x's per-row shape, weight
    in x's dtype with x's features in dimension 1, all on x's device."""
    _check_tensor(op, "x", x, dim, DATA_DTYPES, x.device)
    _check_tensor(op, "u", u, dim, (x.dtype,), x.device)
    _check_tensor(op, "h", h, dim, KERNEL_STREAM_DTYPES, x.device)
    _check_tensor(op, "weight", weight, dim, (x.dtype,), x.device)
    if u.shape != x.shape:
        raise ValueError(f"{op}: u must be shaped like x {tuple(x.shape)}, got {tuple(u.shape)}")
    if h.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"{op}: h must be [R, {', '.join(map(str, x.shape[1:]))}] (x's shape per row), got {tuple(h.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: weight {tuple(weight.shape)} takes {weight.shape[1]} inputs, x {tuple(x.shape)} has {x.shape[1]}"
        )
    _check_mask(op, mask, weight)
    _check_channel_vector(op, "bias", bias, weight.shape[0], x.device)
    _check_affine(op, scale, shift, weight.shape[0], x.device)
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {type(relu).__name__}")
    _check_multipliers(op, multipliers)


def check_backward_arguments(
    op: str, dim: int, g: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, scale: Tensor | None
) -> None:
    """Checks the backward's arguments except the layer geometry: g and h alike in
    :data:`KERNEL_STREAM_DTYPES` with the same rows, g's features the weight's outputs,
    h's its inputs, all on g's device."""
    _check_tensor(op, "g", g, dim, KERNEL_STREAM_DTYPES, g.device)
    _check_tensor(op, "h", h, dim, (g.dtype,), g.device)
    _check_tensor(op, "weight", weight, dim, DATA_DTYPES, g.device)
    if h.shape[0] != g.shape[0]:
        raise ValueError(f"{op}: g and h must have the same rows R, got {tuple(g.shape)} and {tuple(h.shape)}")
    if g.shape[1] != weight.shape[0] or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: weight {tuple(weight.shape)} maps {weight.shape[1]} inputs to {weight.shape[0]} "
            f"outputs; got g {tuple(g.shape)} and h {tuple(h.shape)}"
        )
    _check_mask(op, mask, weight)
    _check_channel_vector(op, "scale", scale, weight.shape[0], g.device)


def without_b_peak(outputs: tuple, b_peak: bool) -> tuple:
    """The forward's ``(a, b, c, b_amax, c_amax)``, with None for ``b_amax`` unless
    ``b_peak``. A caller that measures B's peak later anyway (the fused plan's residual
    add + ReLU on the CPU, ``pxkern::gate_streams``) asks for none: the CPU backend then
    skips a pass over ``b`` for layers without a ReLU, whose peak no epilogue yields.
    Every backend answers alike, whatever it computed."""
    return outputs if b_peak else (*outputs[:3], None, outputs[4])
