"""PX scores of a block-sparse Linear weight: ``pxkern::bsr_px_scores``.

For a Linear layer evaluated on stream C of PX, ``y = inputs @ (W∘W).T``, with cotangents
``grad_out = dL/dy``, the PX score of a weight is ``|grad_out.T @ inputs| * W**2``. With
``W [M, K]`` in BSR form (the fields of :mod:`pxkern.ops.bsr_dense_mm`), this op returns
the scores of the stored weights only, in the layout of ``values``
(``[nnz_blocks, bm, bn]``); the C++ and Triton kernels compute each stored block of
``grad_out.T @ inputs`` in registers and never form the dense ``[M, K]`` product.

Backends as for :mod:`pxkern.ops.bsr_dense_mm`: ``"cpp"`` (CPU, float32 and float64),
``"triton"`` (:mod:`pxkern.kernels.triton.bsr_px_scores`, programs over the stored
blocks, also float16 and bfloat16, whose scores come out in float32), ``"torch"`` (the dense
product formed and gathered at the stored blocks). Forward only: the scores are not
differentiated.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.ops.bsr_dense_mm import _check_bsr, _check_x, _contiguous_fields, stored_block_products

__all__ = ["bsr_px_scores"]


def bsr_px_scores(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: Sequence[int],
    grad_out: Tensor,
    inputs: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``|grad_out.T @ inputs| * W**2`` at the stored blocks of a block-sparse ``W``.

    Args:
        values, row_offsets, column_indices, shape: ``W [M, K]`` as for
            :func:`pxkern.ops.bsr_dense_mm.bsr_dense_mm`.
        grad_out: ``[..., M]``, cotangents of the layer output; same dtype and device as
            ``values``.
        inputs: ``[..., K]``, the layer inputs, with the same leading dimensions as
            ``grad_out`` (they are summed over).
        backend: ``"cpp"``, ``"triton"`` or ``"torch"`` to force one, None to let
            :func:`pxkern.backend.choose_backend` pick.

    Returns:
        ``[nnz_blocks, bm, bn]``: for block ``p`` of block row ``i`` and block column
        ``j = column_indices[p]``, ``|G[i*bm:(i+1)*bm, j*bn:(j+1)*bn]| * values[p]**2``
        with ``G = grad_out.T @ inputs`` (leading dimensions flattened). In the dtype of
        ``values``, float32 for float16 and bfloat16.
    """
    op = "bsr_px_scores"
    m, k, backend = _check_bsr(op, values, row_offsets, column_indices, shape, None, backend)
    _check_x(op, grad_out, values)
    _check_x(op, inputs, values)
    if grad_out.dim() == 0 or grad_out.shape[-1] != m:
        raise ValueError(
            f"{op}: grad_out must be [..., M] with M = {m}, got {tuple(grad_out.shape)}"
        )
    if inputs.dim() == 0 or inputs.shape[-1] != k:
        raise ValueError(f"{op}: inputs must be [..., K] with K = {k}, got {tuple(inputs.shape)}")
    if grad_out.shape[:-1] != inputs.shape[:-1]:
        raise ValueError(
            f"{op}: grad_out {tuple(grad_out.shape)} and inputs {tuple(inputs.shape)} must have "
            "the same leading dimensions"
        )
    grad_rows, input_rows = grad_out.reshape(-1, m), inputs.reshape(-1, k)
    fields = _contiguous_fields(values, row_offsets, column_indices)
    if backend == "triton":
        from pxkern.kernels.triton.bsr_px_scores import bsr_px_scores_triton

        return bsr_px_scores_triton(*fields, [m, k], grad_rows, input_rows)
    if backend == "cpp":
        return torch.ops.pxkern.bsr_px_scores(
            *fields, [m, k], grad_rows.contiguous(), input_rows.contiguous()
        )
    products = stored_block_products(row_offsets, column_indices, [m, k], values.shape[1:],
                                     grad_rows, input_rows)
    return products.abs() * values.square()


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::bsr_px_scores")
    def _bsr_px_scores_fake(
        values: Tensor,
        row_offsets: Tensor,
        column_indices: Tensor,
        shape: Sequence[int],
        grad_out: Tensor,
        inputs: Tensor,
    ) -> Tensor:
        torch._check(
            grad_out.dim() == 2 and inputs.dim() == 2 and grad_out.shape[1] == shape[0]
            and inputs.shape[1] == shape[1] and grad_out.shape[0] == inputs.shape[0],
            lambda: f"bsr_px_scores: grad_out {tuple(grad_out.shape)} and inputs "
            f"{tuple(inputs.shape)} do not fit W of shape {list(shape)}",
        )
        torch._check(
            grad_out.dtype == values.dtype and inputs.dtype == values.dtype,
            lambda: "bsr_px_scores: grad_out and inputs dtypes must match values",
        )
        return values.new_empty(values.shape)
