"""Block-sparse (BSR) times dense: ``bsr_dense_mm`` (``W @ x``) and ``bsr_linear``
(``x @ W^T``).

``W [M, K]`` is given by its BSR fields, the layout of ``torch.sparse_bsr`` tensors
(``values()``, ``crow_indices()``, ``col_indices()`` with int32 indices):

* ``values`` ``[nnz_blocks, bm, bn]``, each block row-major;
* ``row_offsets`` int32 ``[M / bm + 1]``, the blocks of block row ``i`` are
  ``row_offsets[i]:row_offsets[i + 1]``;
* ``column_indices`` int32 ``[nnz_blocks]``, block column of each block (sorted within a
  block row by convention; the kernels accept any order).

``square_weight=True`` multiplies by ``W∘W`` instead (stream C of PX): the kernels square
each stored value in registers, no squared copy of the weight is made.

Backends (:func:`pxkern.backend.choose_backend`, ``backend=`` or ``PXKERN_BACKEND``):

* ``"cpp"``: the C++ kernels ``pxkern::bsr_dense_mm`` / ``pxkern::bsr_linear``, CPU
  tensors, float32 and float64; they check the block structure;
* ``"triton"``: :mod:`pxkern.kernels.triton.bsr_dense_mm` / ``bsr_linear``, CUDA tensors
  (CPU tensors under ``TRITON_INTERPRET=1``), float16, bfloat16, float32 and float64
  with block sizes 16, 32, 64 or 128; they trust the block structure (a
  :class:`pxkern.sparse.BlockSparseMatrix` is validated when it is built);
* ``"torch"``: W made dense and multiplied with ``torch.mm``/``F.linear``, float32 and
  float64.

Autograd: the ops of every backend are differentiable in ``values``, ``x`` and ``bias``.
The input gradient is the same product with ``W``'s transpose (its structure sorted once
per backward); the gradient of the stored values is the dense product of the cotangent
and the input gathered at the stored blocks (:func:`stored_block_products`), which costs
one dense ``[M, K]`` temporary: a training-time path, not the inference one.
"""

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import choose_backend

__all__ = ["bsr_dense_mm", "bsr_linear"]

_IMPLEMENTED = ("cpp", "triton", "torch")
_VALUE_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "torch": (torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
# Powers of two (tl.arange), at least 16 (tl.dot), at most 128 (registers per program).
_TRITON_BLOCK_SIZES = (16, 32, 64, 128)


def _one_of(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check_bsr(
    op: str,
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    bias: Tensor | None,
    backend: str | None,
) -> tuple[int, int, str]:
    """Validates the BSR fields, shape and bias for the backend that will run ``op``;
    returns ``(M, K, backend)``. The block structure itself (offsets non-decreasing,
    column indices in range) is checked by the C++ kernels, trusted by the Triton ones."""
    for name, tensor in (
        ("values", values), ("row_offsets", row_offsets), ("column_indices", column_indices)
    ):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(tensor).__name__}")
    backend = choose_backend(op, values.device, backend, implemented=_IMPLEMENTED)
    if values.dtype not in _VALUE_DTYPES[backend]:
        hint = (
            " (float16 and bfloat16 need backend='triton')"
            if values.dtype in _VALUE_DTYPES["triton"] else ""
        )
        raise TypeError(
            f"{op}: values must be {_one_of(_VALUE_DTYPES[backend])} on the {backend!r} "
            f"backend, got {values.dtype}{hint}"
        )
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
    if backend == "triton" and not {bm, bn} <= set(_TRITON_BLOCK_SIZES):
        raise ValueError(
            f"{op}: the 'triton' backend needs block sizes in {_TRITON_BLOCK_SIZES}, got "
            f"{bm}x{bn}"
        )
    return m, k, backend


def _check_x(op: str, x: Tensor, values: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype != values.dtype or x.device != values.device:
        raise TypeError(
            f"{op}: x ({x.dtype}, {x.device}) must match values ({values.dtype}, {values.device})"
        )


def _contiguous_fields(
    values: Tensor, row_offsets: Tensor, column_indices: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The BSR fields as the kernels take them (a no-op for BlockSparseMatrix fields)."""
    return values.contiguous(), row_offsets.contiguous(), column_indices.contiguous()


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


def stored_block_products(
    row_offsets: Tensor, column_indices: Tensor, shape: Sequence[int], block: Sequence[int],
    left: Tensor, right: Tensor,
) -> Tensor:
    """``G = left^T @ right`` (``left [R, M]``, ``right [R, K]``) at the stored blocks of a
    BSR matrix of ``shape`` ``(M, K)``: ``[nnz_blocks, bm, bn]`` in the order of
    ``column_indices``. Formed densely, then gathered."""
    (m, k), (bm, bn) = shape, block
    nnz = column_indices.numel()
    product = (left.T @ right).reshape(m // bm, bm, k // bn, bn).transpose(1, 2)
    block_rows = torch.repeat_interleave(
        torch.arange(m // bm, device=left.device), row_offsets.diff().long(), output_size=nnz
    )
    return product[block_rows, column_indices.long()]


def bsr_dense_mm(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    x: Tensor,
    bias: Tensor | None = None,
    square_weight: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """``Y = W @ x + bias[:, None]`` for a block-sparse ``W`` (``W∘W`` if ``square_weight``).

    Args:
        values: ``[nnz_blocks, bm, bn]``; float32 or float64, also float16 or bfloat16
            on the Triton backend.
        row_offsets: int32 ``[M / bm + 1]``.
        column_indices: int32 ``[nnz_blocks]``.
        shape: ``(M, K)``, multiples of ``(bm, bn)``.
        x: ``[K, N]``, same dtype and device as ``values`` (any strides).
        bias: ``[M]`` or None.
        square_weight: multiply by ``W∘W`` (each stored value squared in registers).
        backend: ``"cpp"``, ``"triton"`` or ``"torch"`` to force one, None to let
            :func:`pxkern.backend.choose_backend` pick.

    Returns:
        ``[M, N]`` in the dtype of ``values``.
    """
    op = "bsr_dense_mm"
    m, k, backend = _check_bsr(op, values, row_offsets, column_indices, shape, bias, backend)
    _check_x(op, x, values)
    _check_square_weight(op, square_weight)
    if x.dim() != 2 or x.shape[0] != k:
        raise ValueError(f"{op}: x must be [K, N] with K = {k}, got {tuple(x.shape)}")
    fields = _contiguous_fields(values, row_offsets, column_indices)
    if backend == "triton":
        _register_triton_autograd()
        from pxkern.kernels.triton.bsr_dense_mm import bsr_dense_mm_triton

        bias = None if bias is None else bias.contiguous()
        return bsr_dense_mm_triton(*fields, [m, k], x, bias, square_weight)
    if backend == "cpp":
        return torch.ops.pxkern.bsr_dense_mm(*fields, [m, k], x.contiguous(), bias, square_weight)
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
    *,
    backend: str | None = None,
    transposed_blocks: Tensor | None = None,
) -> Tensor:
    """``x @ W.T + bias`` for a block-sparse ``W``, as ``F.linear(x, W, bias)``; with
    ``square_weight``, ``F.linear(x, W**2, bias)``.

    Args:
        values, row_offsets, column_indices, shape: ``W [M, K]`` as for :func:`bsr_dense_mm`.
        x: ``[..., K]``, same dtype and device as ``values``.
        bias: ``[M]`` or None.
        square_weight: use ``W∘W`` (each stored value squared in registers).
        backend: as for :func:`bsr_dense_mm`.
        transposed_blocks: ``values.transpose(1, 2).contiguous()``, kept by a caller whose
            weight does not change (:class:`pxkern.sparse.BlockSparseLinear`); the C++
            kernel otherwise transposes every block on each call, which costs 10-20% of
            the product at block densities 0.05-0.2. Its contents are trusted; the other
            backends ignore it.

    Returns:
        ``[..., M]`` in the dtype of ``values``. The kernels work on the rows of ``x``
        directly (no transposes).
    """
    op = "bsr_linear"
    m, k, backend = _check_bsr(op, values, row_offsets, column_indices, shape, bias, backend)
    _check_x(op, x, values)
    _check_square_weight(op, square_weight)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K] with K = {k}, got {tuple(x.shape)}")
    fields = _contiguous_fields(values, row_offsets, column_indices)
    if backend == "triton":
        _register_triton_autograd()
        from pxkern.kernels.triton.bsr_linear import bsr_linear_triton

        bias = None if bias is None else bias.contiguous()
        y = bsr_linear_triton(*fields, [m, k], x.reshape(-1, k), bias, square_weight)
        return y.reshape(*x.shape[:-1], m)
    if backend == "cpp":
        y = torch.ops.pxkern.bsr_linear(
            *fields, [m, k], x.reshape(-1, k).contiguous(), bias, square_weight, transposed_blocks
        )
        return y.reshape(*x.shape[:-1], m)
    weight = _dense_weight(values, row_offsets, column_indices, shape)
    return F.linear(x, weight.square() if square_weight else weight, bias)


def _transposed_fields(values: Tensor, row_offsets: Tensor, column_indices: Tensor,
                       shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The BSR fields of ``W^T``."""
    from pxkern.sparse.format import BlockSparseMatrix

    t = BlockSparseMatrix(values, row_offsets, column_indices, tuple(shape)).transpose()
    return t.values, t.row_offsets, t.column_indices, list(t.shape)


def _setup_context(ctx, inputs, output) -> None:
    # The C++ bsr_linear takes one more input, transposed_blocks (a copy of values: its
    # gradient is that of values).
    values, row_offsets, column_indices, shape, x, bias, square_weight = inputs[:7]
    ctx.save_for_backward(values, row_offsets, column_indices, x)
    ctx.shape, ctx.square_weight, ctx.has_bias = list(shape), square_weight, bias is not None
    ctx.extra_inputs = len(inputs) - 7


def _backward(product: Callable, as_rows: Callable, bias_dim: int) -> Callable:
    """The backward of one of the two products: ``product`` (the op itself) runs the
    transposed weight for the input gradient; ``as_rows`` turns the cotangent and the
    input into ``[rows, M]`` / ``[rows, K]`` for the stored-block value gradient; the bias
    gradient sums the cotangent over ``bias_dim``."""

    def backward(ctx, grad_y):
        values, row_offsets, column_indices, x = ctx.saved_tensors
        grad_values = grad_x = grad_bias = None
        if ctx.needs_input_grad[4]:
            transposed = _transposed_fields(values, row_offsets, column_indices, ctx.shape)
            grad_x = product(*transposed, grad_y, square_weight=ctx.square_weight)
        if ctx.needs_input_grad[0]:
            blocks = stored_block_products(row_offsets, column_indices, ctx.shape, values.shape[1:],
                                           as_rows(grad_y), as_rows(x))
            grad_values = 2 * values * blocks if ctx.square_weight else blocks
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_y.sum(bias_dim)
        return grad_values, None, None, None, grad_x, grad_bias, None, *[None] * ctx.extra_inputs

    return backward


# Y = W x + b: dx = W^T dY, dW = dY x^T at the stored blocks, db = dY summed over columns.
_bsr_dense_mm_backward = _backward(bsr_dense_mm, lambda t: t.T, bias_dim=1)
# y = x W^T + b: dx = dy W, dW = dy^T x at the stored blocks, db = dy summed over rows.
_bsr_linear_backward = _backward(bsr_linear, lambda t: t, bias_dim=0)


def register_autograd(dense_mm_op: str, linear_op: str) -> None:
    """Gives a backend's two ops (same schema as ``pxkern::bsr_dense_mm``/``bsr_linear``)
    their backward; the backward's products dispatch like any call of the ops."""
    torch.library.register_autograd(dense_mm_op, _bsr_dense_mm_backward, setup_context=_setup_context)
    torch.library.register_autograd(linear_op, _bsr_linear_backward, setup_context=_setup_context)


@functools.cache
def _register_triton_autograd() -> None:
    """The Triton ops exist once their (lazily imported) modules are; then they get the
    backward, once."""
    import pxkern.kernels.triton.bsr_dense_mm  # noqa: F401  (defines the op)
    import pxkern.kernels.triton.bsr_linear  # noqa: F401

    register_autograd("pxkern::bsr_dense_mm_triton", "pxkern::bsr_linear_triton")


if EXTENSION_AVAILABLE:
    register_autograd("pxkern::bsr_dense_mm", "pxkern::bsr_linear")

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
        transposed_blocks: Tensor | None = None,
    ) -> Tensor:
        _fake_checks("bsr_linear", values, shape, x, 1)
        return x.new_empty((x.shape[0], shape[0]))
