"""Direct sparse 2-D convolution on the CPU: ``pxkern::sparse_conv2d``.

Same result as ``F.conv2d`` but loops over the nonzero weights only, so it gets faster as
the weight gets sparser (PX streams run the model with masked weights ``W * M`` and with
the 0/1 mask ``M``, whose density falls to ~2 % during iterative pruning). Forward only:
no autograd formula is registered, use it under ``torch.no_grad()``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import choose_backend
from pxkern.ops.measured_choice import density_level, known_choice, second_is_faster

__all__ = ["MAX_SPARSE_DENSITY", "known_sparse_choice", "prefer_sparse_conv2d", "sparse_choice_key", "sparse_conv2d",
           "with_ones_scale"]

# Above this weight density sparse_conv2d never beat F.conv2d (oneDNN) in float32 in
# benchmarks/bench_sparse_conv2d.py (ResNet-20 and VGG-16 layers, 2-core AVX2 CPU), so
# denser float32 weights are not even measured. Float64 convolutions have no oneDNN
# kernel (ATen's im2col + GEMM): there sparse_conv2d wins on some layers even dense
# (ResNet-20's 16-channel 32x32 layers, one sample: 136 against 316 us), so every
# float64 density is measured.
MAX_SPARSE_DENSITY = 0.5

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    pair = list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"sparse_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def sparse_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    ones_scale: Tensor | None = None,
) -> Tensor:
    """2-D convolution that skips the zeros of ``weight``; equals ``F.conv2d``, with
    ``ones_scale`` that of the weight ``weight + ones_scale[:, None, None, None]``.

    Args:
        x: ``[N, C_in, H, W]``, float32 or float64 (made contiguous if it is not).
        weight: ``[C_out, C_in / groups, kh, kw]``, same dtype and device as ``x``; any
            values, typically mostly zeros.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: int or ``(h, w)`` pair; zero padding only.
        groups: number of channel groups.
        ones_scale: ``[C_out]`` or None (groups=1 only): adds ``ones_scale[co]`` to every
            weight of output channel ``co`` at the cost of one box filter of the channel
            sum per sample. A mostly-ones weight ``M * s`` runs as the sparse
            ``(M - 1) * s`` with ``ones_scale=s``.

    Returns:
        ``[N, C_out, H_out, W_out]`` in the memory format of ``x`` (channels-last or
        contiguous), with
        ``H_out = (H + 2 padding_h - dilation_h (kh - 1) - 1) // stride_h + 1`` (same for W).

    Runs the C++ kernel for CPU tensors when the extension is built, ``F.conv2d``
    otherwise. Forward only (no gradient).
    """
    for name, tensor in (("x", x), ("weight", weight)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"sparse_conv2d: {name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"sparse_conv2d: {name} must be 4-D, got shape {tuple(tensor.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"sparse_conv2d: x must be float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(
            f"sparse_conv2d: weight ({weight.dtype}, {weight.device}) must match "
            f"x ({x.dtype}, {x.device})"
        )
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"sparse_conv2d: groups must be a positive int, got {groups!r}")
    if weight.shape[1] * groups != x.shape[1] or weight.shape[0] % groups != 0:
        raise ValueError(
            f"sparse_conv2d: x has {x.shape[1]} channels; weight of shape {tuple(weight.shape)} "
            f"with groups={groups} expects {weight.shape[1] * groups} and C_out divisible by "
            "groups"
        )
    for name, vector in (("bias", bias), ("ones_scale", ones_scale)):
        if vector is not None and (
            vector.shape != (weight.shape[0],) or vector.dtype != x.dtype or vector.device != x.device
        ):
            raise ValueError(
                f"sparse_conv2d: {name} must be [{weight.shape[0]}] {x.dtype} on {x.device}, got "
                f"{tuple(vector.shape)} {vector.dtype} on {vector.device}"
            )
    if ones_scale is not None and groups != 1:
        raise ValueError(f"sparse_conv2d: ones_scale needs groups=1, got groups={groups}")
    stride_hw = _pair(stride, "stride")
    padding_hw = _pair(padding, "padding")
    dilation_hw = _pair(dilation, "dilation")
    if min(stride_hw) < 1 or min(dilation_hw) < 1 or min(padding_hw) < 0:
        raise ValueError(
            f"sparse_conv2d: need stride >= 1, dilation >= 1, padding >= 0; got stride="
            f"{stride_hw}, padding={padding_hw}, dilation={dilation_hw}"
        )
    if _backend(x) == "cpp":
        # The kernel reads channels-last x as it is and answers in its layout, as F.conv2d
        # does; any other strides are made channels-first.
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        return torch.ops.pxkern.sparse_conv2d(
            x, weight.contiguous(), bias, stride_hw, padding_hw, dilation_hw, groups, ones_scale
        )
    return F.conv2d(x, with_ones_scale(weight, ones_scale), bias, stride_hw, padding_hw, dilation_hw, groups)


def with_ones_scale(weight: Tensor, ones_scale: Tensor | None) -> Tensor:
    """The dense weight that ``sparse_conv2d(..., ones_scale=ones_scale)`` convolves with:
    ``weight + ones_scale[co]`` in every weight of output channel ``co``."""
    return weight if ones_scale is None else weight + ones_scale.reshape(-1, 1, 1, 1)


def _backend(x: Tensor) -> str:
    return choose_backend("sparse_conv2d", x.device, implemented=("cpp", "torch"))


def prefer_sparse_conv2d(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                         density: float | None = None, ones_scale: Tensor | None = None) -> bool:
    """Whether ``sparse_conv2d`` beats ``F.conv2d`` for this call, as measured.

    The first call of a configuration (shapes, layout, strides, dtype, threads, weight
    density to a tenth, with or without ``ones_scale``) times the kernels on the real
    inputs and remembers the faster (:mod:`pxkern.ops.measured_choice`, which infers
    some densities from others): oneDNN's speed depends on the layout (channels-last
    input is up to 4x faster on 16-channel layers here) and the sparse kernel's on
    density and shape, so no single crossover density holds. With ``ones_scale``,
    ``F.conv2d`` gets the weight ``weight + ones_scale`` (see :func:`sparse_conv2d`).
    False without the extension, off the CPU, for string paddings and above
    ``MAX_SPARSE_DENSITY`` in float32; True for an all-zero weight without
    ``ones_scale``. ``density``: the fraction of nonzeros of ``weight`` if the
    caller knows it (e.g. from its mask), saving a pass over the weight; otherwise
    counted.
    """
    if _backend(x) != "cpp" or isinstance(padding, str) or weight.numel() == 0:
        return False
    if density is None:
        density = torch.count_nonzero(weight).item() / weight.numel()
    fixed = _fixed_choice(x, density, ones_scale is not None)
    if fixed is not None:
        return fixed
    key = sparse_choice_key(x, weight.shape, stride, padding, dilation, groups, ones_scale is not None)

    def dense() -> Tensor:
        return F.conv2d(x, with_ones_scale(weight, ones_scale), None, stride, padding, dilation, groups)

    def sparse() -> Tensor:
        return sparse_conv2d(x, weight, None, stride, padding, dilation, groups, ones_scale=ones_scale)

    return second_is_faster(key, dense, sparse, level=density_level(density))


def _fixed_choice(x: Tensor, density: float, with_ones_scale: bool) -> bool | None:
    """The choice of :func:`prefer_sparse_conv2d` that needs no measurement, or None."""
    if density > MAX_SPARSE_DENSITY and x.dtype != torch.float64:
        return False
    if density == 0 and not with_ones_scale:
        return True
    return None


def sparse_choice_key(x: Tensor, weight_shape: Sequence[int], stride, padding, dilation, groups: int,
                      with_ones_scale: bool) -> tuple:
    """The configuration :func:`prefer_sparse_conv2d` measures for ``x`` (a meta tensor
    will do) and a weight of ``weight_shape``: everything the timing depends on but the
    density."""
    return (
        "sparse_conv2d", tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last), tuple(weight_shape),
        str(stride), str(padding), str(dilation), groups, x.dtype, torch.get_num_threads(), with_ones_scale,
    )


def known_sparse_choice(x: Tensor, weight_shape: Sequence[int], stride, padding, density: float,
                        with_ones_scale: bool = False) -> bool | None:
    """:func:`prefer_sparse_conv2d`'s answer for a CPU call of this configuration (dilation
    and groups 1) at ``density`` if it needs no timing, else None."""
    fixed = _fixed_choice(x, density, with_ones_scale)
    if fixed is not None:
        return fixed
    return known_choice(sparse_choice_key(x, weight_shape, stride, padding, 1, 1, with_ones_scale),
                        density_level(density))


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::sparse_conv2d")
    def _sparse_conv2d_fake(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        ones_scale: Tensor | None = None,
    ) -> Tensor:
        torch._check(
            weight.shape[1] * groups == x.shape[1],
            lambda: f"sparse_conv2d: x channels {x.shape[1]} != weight.shape[1] * groups",
        )
        out_hw = [
            (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
            // stride[i]
            + 1
            for i in range(2)
        ]
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return x.new_empty((x.shape[0], weight.shape[0], *out_hw)).contiguous(memory_format=layout)
