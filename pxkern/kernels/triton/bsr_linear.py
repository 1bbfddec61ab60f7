"""Triton block-sparse linear layer: ``pxkern::bsr_linear_triton``, ``x @ W^T + bias``
(``W∘W`` with ``square_weight``).

No kernel of its own: ``x @ W^T = (W @ x^T)^T``, so it runs ``_bsr_mm_kernel`` of
:mod:`pxkern.kernels.triton.bsr_dense_mm` with ``X = x^T`` and ``Y = y^T`` as strided
views (nothing is transposed in memory). Each program then reads ``TILE_K`` columns of
``BLOCK_N`` rows of ``x`` and writes ``TILE_M`` columns of ``BLOCK_N`` rows of ``y``.

Cost per call for ``x [R, K]``: that of ``bsr_dense_mm`` with ``N = R``.
"""

import torch
from torch import Tensor

from pxkern.kernels.triton.bsr_dense_mm import launch_bsr_mm

__all__ = ["bsr_linear_triton"]


@torch.library.triton_op("pxkern::bsr_linear_triton", mutates_args=())
def bsr_linear_triton(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    x: Tensor,
    bias: Tensor | None,
    square_weight: bool,
) -> Tensor:
    """``x @ W^T + bias`` for ``W [M, K] = shape`` in BSR form and ``x [R, K]``; inputs
    validated by :func:`pxkern.ops.bsr_dense_mm.bsr_linear`. Returns ``[R, M]``."""
    y = x.new_empty((x.shape[0], shape[0]))
    launch_bsr_mm(values, row_offsets, column_indices, x.t(), bias, y.t(), square_weight)
    return y


@bsr_linear_triton.register_fake
def _bsr_linear_triton_fake(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    x: Tensor,
    bias: Tensor | None,
    square_weight: bool,
) -> Tensor:
    # As for bsr_dense_mm_triton: the interpreter cannot trace the launcher.
    return x.new_empty((x.shape[0], shape[0]))
