"""Triton kernel for the PX scores of a block-sparse Linear weight:
``pxkern::bsr_px_scores_triton``, ``|grad_out^T @ inputs| * W**2`` at the stored blocks.

Kernel ``_bsr_px_scores_kernel``
    Inputs: ``W [M, K]`` as BSR fields (``values [nnz, BM, BN]`` contiguous, int32
    ``block_rows [nnz]`` = block row of each block, int32 ``column_indices [nnz]``),
    ``grad_out [R, M]`` and ``inputs [R, K]`` with any strides. Output:
    ``scores [nnz, BM, BN]``: for block ``p`` at block row ``i``, block column ``j``,
    ``|sum_r grad_out[r, i*BM:(i+1)*BM]^T inputs[r, j*BN:(j+1)*BN]| * values[p]**2``.

    Tiling: program ``(p, t)`` owns tile ``t`` of stored block ``p``, ``TILE_M x TILE_N``
    with ``TILE_M = min(BLOCK_M, BM)``, ``TILE_N = min(BLOCK_N, BN)`` (one program per
    block when the tiles cover it). It loops over the rows in steps of ``BLOCK_R``,
    loading ``grad_out`` transposed (``TILE_M x BLOCK_R``) and ``inputs``
    (``BLOCK_R x TILE_N``) and accumulating ``tl.dot`` in float32 (float64 for float64);
    the epilogue reads the weight tile once, squares it in registers and stores
    ``|acc| * w**2``. The dense ``[M, K]`` product is never formed.

    Cost per call, with ``d`` = block density (``nnz*BM*BN = d*M*K``), ``s`` bytes per
    input element, ``s_out`` per score:
      FLOPs: ``2*R*d*M*K`` (+ ``3*d*M*K`` for the epilogue);
      bytes, compulsory: ``d*M*K*(s + s_out) + R*(M + K)*s + 8*nnz``;
      bytes, loaded by the programs (L2 traffic): ``d*M*K*(s + s_out)`` plus
      ``R*s*d*M*K*(1/TILE_N + 1/TILE_M)`` for ``grad_out`` and ``inputs``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pxkern.kernels.triton.autotune import autotune_configs
from pxkern.kernels.triton.dtypes import accumulator_dtype, dot_operand_dtype

__all__ = ["bsr_px_scores_triton", "scores_dtype"]


def scores_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scores for ``values`` of ``dtype``: float32 for float16 and
    bfloat16 (scores are products of sums and squares, far outside float16's range),
    else ``dtype``."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# (BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages). R is the batch of stream C,
# often 1: short row steps waste nothing there, long ones pay off for large batches.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": r}, num_warps=warps, num_stages=stages)
    for m, n, r, warps, stages in (
        (32, 32, 16, 2, 2),
        (64, 64, 16, 4, 2),
        (128, 128, 16, 8, 2),
        (64, 64, 64, 4, 3),
        (128, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
    )
]
# 64 x 64 tiles split 128-wide blocks in both directions, and 32-row steps leave a
# partial last step for most R, so the interpreted tests run every tiling path.
_INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=1
)


@triton.autotune(
    configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["R", "BM", "BN"],
)
@triton.jit
def _bsr_px_scores_kernel(
    values_ptr, block_rows_ptr, column_indices_ptr, grad_ptr, inputs_ptr, scores_ptr,
    R,
    stride_gr, stride_gm, stride_ir, stride_ik,
    BM: tl.constexpr, BN: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Block sizes are powers of two, so a capped tile divides its block exactly.
    TILE_M: tl.constexpr = min(BLOCK_M, BM)
    TILE_N: tl.constexpr = min(BLOCK_N, BN)
    block = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    m_in_block = (tile // (BN // TILE_N)) * TILE_M + tl.arange(0, TILE_M)
    n_in_block = (tile % (BN // TILE_N)) * TILE_N + tl.arange(0, TILE_N)
    # int64 offsets: R * M or R * K may pass 2**31 elements.
    out_features = tl.load(block_rows_ptr + block).to(tl.int64) * BM + m_in_block
    in_features = tl.load(column_indices_ptr + block).to(tl.int64) * BN + n_in_block

    acc = tl.full((TILE_M, TILE_N), 0, dtype=ACC_DTYPE)  # not tl.zeros: see bsr_dense_mm
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = rows < R
        g = tl.load(
            grad_ptr + out_features[:, None] * stride_gm + rows[None, :] * stride_gr,
            mask=row_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            inputs_ptr + rows[:, None] * stride_ir + in_features[None, :] * stride_ik,
            mask=row_mask[:, None],
            other=0.0,
        )
        # "ieee": scores need float32 products; TF32 would cost 3 decimal digits.
        acc = tl.dot(g.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision="ieee")

    tile_offsets = block * (BM * BN) + m_in_block[:, None] * BN + n_in_block[None, :]
    w = tl.load(values_ptr + tile_offsets).to(ACC_DTYPE)
    tl.store(scores_ptr + tile_offsets, (tl.abs(acc) * (w * w)).to(scores_ptr.dtype.element_ty))


@torch.library.triton_op("pxkern::bsr_px_scores_triton", mutates_args=())
def bsr_px_scores_triton(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    grad_out: Tensor,
    inputs: Tensor,
) -> Tensor:
    """PX scores ``[nnz, bm, bn]`` of the stored blocks of ``W [M, K] = shape`` from
    ``grad_out [R, M]`` and ``inputs [R, K]`` (any strides); inputs validated by
    :func:`pxkern.ops.bsr_px_scores.bsr_px_scores`. Scores are in
    :func:`scores_dtype` of ``values.dtype``."""
    nnz, bm, bn = values.shape
    scores = values.new_empty(values.shape, dtype=scores_dtype(values.dtype))
    if nnz == 0:
        return scores
    # The block row of each block, so that a program finds its rows without a search.
    block_rows = torch.repeat_interleave(
        torch.arange(row_offsets.numel() - 1, dtype=torch.int32, device=values.device),
        row_offsets.diff(),
        output_size=nnz,
    )

    def grid(meta):
        return nnz, (bm // min(meta["BLOCK_M"], bm)) * (bn // min(meta["BLOCK_N"], bn))

    torch.library.wrap_triton(_bsr_px_scores_kernel)[grid](
        values, block_rows, column_indices, grad_out, inputs, scores,
        grad_out.shape[0],
        grad_out.stride(0), grad_out.stride(1), inputs.stride(0), inputs.stride(1),
        BM=bm, BN=bn,
        ACC_DTYPE=accumulator_dtype(values.dtype), DOT_DTYPE=dot_operand_dtype(values.dtype),
    )
    return scores


@bsr_px_scores_triton.register_fake
def _bsr_px_scores_triton_fake(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    grad_out: Tensor,
    inputs: Tensor,
) -> Tensor:
    # triton_op would trace the launcher itself, which fails when the kernel is
    # interpreted (the interpreter cannot run on fake tensors).
    return values.new_empty(values.shape, dtype=scores_dtype(values.dtype))
