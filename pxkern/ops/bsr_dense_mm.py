"""Block-sparse (BSR) times dense on the CPU: ``pxkern::bsr_dense_mm`` and ``pxkern::bsr_linear``.

``W [M, K]`` is given by its BSR fields, the layout of ``torch.sparse_bsr`` tensors
(``values()``, ``crow_indices()``, ``col_indices()`` with int32 indices):

* ``values`` ``[nnz_blocks, bm, bn]``, each block row-major;
* ``row_offsets`` int32 ``[M / bm + 1]``, the blocks of block row ``i`` are
  ``row_offsets[i]:row_offsets[i + 1]``;
* ``column_indices`` int32 ``[nnz_blocks]``, block column of each block (sorted within a
  block row by convention; the kernel accepts any order).

``square_weight=True`` multiplies by ``W∘W`` instead (stream C of PX): the kernels square
each stored value in registers, no squared copy of the weight is made.

The C++ kernels run for CPU tensors when the extension is built; otherwise (or on other
devices) W is made dense and multiplied with ``torch.mm``/``F.linear``. Forward only: no
autograd formula is registered, use them under ``torch.no_grad()``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE

__all__ = ["bsr_dense_mm", "bsr_linear"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_bsr(
    op: str,
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    bias: Tensor | None,
) -> tuple[int, int]:
    """Validates the BSR fields, shape and bias; returns ``(M, K)``. The block structure
    itself (offsets non-decreasing, column indices in range) is checked by the kernel."""
    for name, tensor in (
        ("values", values), ("row_offsets", row_offsets), ("column_indices", column_indices)
    ):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(tensor).__name__}")
    if values.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: values must be float32 or float64, got {values.dtype}")
    if row_offsets.dtype != torch.int32 or column_indices.dtype != torch.int32:
        raise TypeError(
            f"{op}: row_offsets and column_indices must be int32, got {row_offsets.dtype} "
            f"and {column_indices.dtype}"
        )
    if values.dim() != 3:
        raise ValueError(
            f"{op}: values must be 3-D [nnz_blocks, bm, bn], got shape {tuple(values.shape)}"
        )
    if len(shape) != 2 or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{op}: shape must be two non-negative ints [M, K], got {shape!r}")
    m, k = shape
    nnz, bm, bn = values.shape
    if bm == 0 or bn == 0 or m % bm or k % bn:
        raise ValueError(f"{op}: block size {bm}x{bn} does not divide shape {list(shape)}")
    if row_offsets.shape != (m // bm + 1,):
        raise ValueError(
            f"{op}: row_offsets must have shape [M / bm + 1] = [{m // bm + 1}], got "
            f"{tuple(row_offsets.shape)}"
        )
    if column_indices.shape != (nnz,):
        raise ValueError(
            f"{op}: column_indices must have shape [nnz_blocks] = [{nnz}], got "
            f"{tuple(column_indices.shape)}"
        )
    if bias is not None and (
        bias.shape != (m,) or bias.dtype != values.dtype or bias.device != values.device
    ):
        raise ValueError(
            f"{op}: bias must be [{m}] {values.dtype} on {values.device}, got "
            f"{tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    return m, k


def _check_x(op: str, x: Tensor, values: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype != values.dtype or x.device != values.device:
        raise TypeError(
            f"{op}: x ({x.dtype}, {x.device}) must match values ({values.dtype}, {values.device})"
        )


def _use_extension(*tensors: Tensor) -> bool:
    return EXTENSION_AVAILABLE and all(t.device.type == "cpu" for t in tensors)


def _dense_weight(
    values: Tensor, row_offsets: Tensor, column_indices: Tensor, shape: Sequence[int]
) -> Tensor:
    """W as a dense ``[M, K]`` tensor (the fallback path); validates the block structure."""
    return torch.sparse_bsr_tensor(
        row_offsets, column_indices, values, tuple(shape), check_invariants=True
    ).to_dense()


def _check_square_weight(op: str, square_weight: bool) -> None:
    if not isinstance(square_weight, bool):
        raise TypeError(f"{op}: square_weight must be a bool, got {type(square_weight).__name__}")


def bsr_dense_mm(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    x: Tensor,
    bias: Tensor | None = None,
    square_weight: bool = False,
) -> Tensor:
    """``Y = W @ x + bias[:, None]`` for a block-sparse ``W`` (``W∘W`` if ``square_weight``).

    Args:
        values: ``[nnz_blocks, bm, bn]`` float32 or float64.
        row_offsets: int32 ``[M / bm + 1]``.
        column_indices: int32 ``[nnz_blocks]``.
        shape: ``(M, K)``, multiples of ``(bm, bn)``.
        x: ``[K, N]``, same dtype and device as ``values`` (made contiguous if it is not).
        bias: ``[M]`` or None.
        square_weight: multiply by ``W∘W`` (each stored value squared in registers).

    Returns:
        ``[M, N]``.
    """
    m, k = _check_bsr("bsr_dense_mm", values, row_offsets, column_indices, shape, bias)
    _check_x("bsr_dense_mm", x, values)
    _check_square_weight("bsr_dense_mm", square_weight)
    if x.dim() != 2 or x.shape[0] != k:
        raise ValueError(f"bsr_dense_mm: x must be [K, N] with K = {k}, got {tuple(x.shape)}")
    if _use_extension(values, x):
        return torch.ops.pxkern.bsr_dense_mm(
            values.contiguous(), row_offsets.contiguous(), column_indices.contiguous(),
            [m, k], x.contiguous(), bias, square_weight,
        )
    weight = _dense_weight(values, row_offsets, column_indices, shape)
    y = torch.mm(weight.square() if square_weight else weight, x)
    return y if bias is None else y + bias[:, None]


def bsr_linear(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    x: Tensor,
    bias: Tensor | None = None,
    square_weight: bool = False,
) -> Tensor:
    """``x @ W.T + bias`` for a block-sparse ``W``, as ``F.linear(x, W, bias)``; with
    ``square_weight``, ``F.linear(x, W**2, bias)``.

    Args:
        values, row_offsets, column_indices, shape: ``W [M, K]`` as for :func:`bsr_dense_mm`.
        x: ``[..., K]``, same dtype and device as ``values``.
        bias: ``[M]`` or None.
        square_weight: use ``W∘W`` (each stored value squared in registers).

    Returns:
        ``[..., M]``. The kernel works on the rows of ``x`` directly (no transposes).
    """
    m, k = _check_bsr("bsr_linear", values, row_offsets, column_indices, shape, bias)
    _check_x("bsr_linear", x, values)
    _check_square_weight("bsr_linear", square_weight)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"bsr_linear: x must be [..., K] with K = {k}, got {tuple(x.shape)}")
    if _use_extension(values, x):
        y = torch.ops.pxkern.bsr_linear(
            values.contiguous(), row_offsets.contiguous(), column_indices.contiguous(),
            [m, k], x.reshape(-1, k).contiguous(), bias, square_weight,
        )
        return y.reshape(*x.shape[:-1], m)
    weight = _dense_weight(values, row_offsets, column_indices, shape)
    return F.linear(x, weight.square() if square_weight else weight, bias)


if EXTENSION_AVAILABLE:

    def _fake_checks(op: str, values: Tensor, shape: Sequence[int], x: Tensor, k_dim: int) -> None:
        torch._check(
            x.dim() == 2 and x.shape[k_dim] == shape[1],
            lambda: f"{op}: x of shape {tuple(x.shape)} does not fit W of shape {list(shape)}",
        )
        torch._check(x.dtype == values.dtype, lambda: f"{op}: x dtype must match values")

    @torch.library.register_fake("pxkern::bsr_dense_mm")
    def _bsr_dense_mm_fake(
        values: Tensor,
        row_offsets: Tensor,
        column_indices: Tensor,
        shape: Sequence[int],
        x: Tensor,
        bias: Tensor | None,
        square_weight: bool = False,
    ) -> Tensor:
        _fake_checks("bsr_dense_mm", values, shape, x, 0)
        return x.new_empty((shape[0], x.shape[1]))

    @torch.library.register_fake("pxkern::bsr_linear")
    def _bsr_linear_fake(
        values: Tensor,
        row_offsets: Tensor,
        column_indices: Tensor,
        shape: Sequence[int],
        x: Tensor,
        bias: Tensor | None,
        square_weight: bool = False,
    ) -> Tensor:
        _fake_checks("bsr_linear", values, shape, x, 1)
        return x.new_empty((x.shape[0], shape[0]))
