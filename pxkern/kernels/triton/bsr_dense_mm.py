"""Triton kernel for a block-sparse (BSR) weight times a dense matrix:
``pxkern::bsr_dense_mm_triton``, ``Y = W @ X + bias[:, None]`` (``W∘W`` with
``square_weight``).

Kernel ``_bsr_mm_kernel``
    Inputs: ``W [M, K]`` as BSR fields (``values [nnz, BM, BN]`` contiguous, int32
    ``row_offsets [M / BM + 1]``, int32 ``column_indices [nnz]``), ``X [K, N]`` and
    ``bias [M]`` (optional). Output: ``Y [M, N]``. ``X`` and ``Y`` are addressed through
    strides, so :mod:`pxkern.kernels.triton.bsr_linear` runs the same kernel on
    transposed views (``x @ W^T = (W @ x^T)^T``).

    Tiling: program ``(c, r)`` owns the rows ``r*TILE_M .. +TILE_M`` of ``Y``, a slice of
    one block row (``TILE_M = min(BLOCK_M, BM)``), and the columns ``c*BLOCK_N ..
    +BLOCK_N``. It walks the stored blocks of its block row; per block it loads
    ``TILE_M x TILE_K`` slices of the block (``TILE_K = min(BLOCK_K, BN)``) and the
    matching ``TILE_K x BLOCK_N`` tiles of ``X`` and accumulates ``tl.dot`` in float32
    (float64 for float64). ``square_weight`` squares each loaded slice in registers. The
    bias is added in the accumulator; ``Y`` is stored once, in the input dtype.

    Cost per call, with ``d`` = block density (``nnz*BM*BN = d*M*K``) and ``s`` bytes
    per element:
      FLOPs: ``2*d*M*K*N`` (+ ``M*N`` bias adds, + one multiply per loaded weight when
      squaring);
      bytes, compulsory: ``(d*M*K + K*N + M*N + M)*s + 4*(M/BM + 1 + nnz)``;
      bytes, loaded by the programs (L2 traffic): weights ``d*M*K*s*ceil(N/BLOCK_N)``,
      ``X`` ``d*K*N*s*M/TILE_M``, plus the writes of ``Y``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pxkern.kernels.triton.autotune import autotune_configs
from pxkern.kernels.triton.dtypes import accumulator_dtype, dot_operand_dtype

__all__ = ["bsr_dense_mm_triton", "launch_bsr_mm"]

# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages). Few columns (a batch-1 linear)
# favour short row tiles, which give more programs; wide X favours large tiles.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    for m, k, n, warps, stages in (
        (16, 64, 16, 2, 4),
        (32, 64, 32, 4, 4),
        (64, 32, 64, 4, 3),
        (64, 64, 64, 4, 2),
        (64, 32, 128, 4, 3),
        (128, 32, 64, 4, 3),
        (128, 32, 128, 8, 3),
        (128, 64, 128, 8, 2),
    )
]
# 64-wide tiles split the 128-wide blocks in both directions, and 32 columns leave a
# partial column tile for most N, so the interpreted tests run every tiling path.
_INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1
)


@triton.autotune(
    configs=autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["M", "N", "stride_xk", "BM", "BN"],
)
@triton.jit
def _bsr_mm_kernel(
    values_ptr, row_offsets_ptr, column_indices_ptr, x_ptr, bias_ptr, y_ptr,
    M, N,
    stride_xk, stride_xn, stride_ym, stride_yn,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SQUARE_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Block sizes are powers of two, so a capped tile divides its block exactly.
    TILE_M: tl.constexpr = min(BLOCK_M, BM)
    TILE_K: tl.constexpr = min(BLOCK_K, BN)
    first_row = tl.program_id(1) * TILE_M
    block_row = first_row // BM
    rows_in_block = first_row % BM + tl.arange(0, TILE_M)
    # int64 offsets: K * N or N * M may pass 2**31 elements.
    columns = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_mask = columns < N
    k_in_tile = tl.arange(0, TILE_K)
    # Offsets of the first weight slice in a block and pointers to the first X tile.
    w_offsets = rows_in_block[:, None] * BN + k_in_tile[None, :]
    x_first_tile = x_ptr + k_in_tile[:, None] * stride_xk + columns[None, :] * stride_xn

    # tl.full, not tl.zeros: the same code, but a builtin, which the interpreter runs
    # without re-patching the language module on every program.
    acc = tl.full((TILE_M, BLOCK_N), 0, dtype=ACC_DTYPE)
    # An int64 block index p keeps p * BM * BN from overflowing.
    first_block = tl.load(row_offsets_ptr + block_row).to(tl.int64)
    end_block = tl.load(row_offsets_ptr + block_row + 1).to(tl.int64)
    for p in range(first_block, end_block):
        w_ptrs = values_ptr + p * (BM * BN) + w_offsets
        x_ptrs = x_first_tile + tl.load(column_indices_ptr + p).to(tl.int64) * BN * stride_xk
        for k0 in tl.static_range(0, BN, TILE_K):
            w = tl.load(w_ptrs + k0).to(ACC_DTYPE)
            if SQUARE_WEIGHT:
                w = w * w
            x = tl.load(x_ptrs + k0 * stride_xk, mask=column_mask[None, :], other=0.0)
            # "ieee": float32 inputs get float32 products, as torch.mm gives by default.
            acc = tl.dot(w.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision="ieee")

    rows = first_row + tl.arange(0, TILE_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows).to(ACC_DTYPE)[:, None]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + columns[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=column_mask[None, :])


def launch_bsr_mm(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    x: Tensor,
    bias: Tensor | None,
    y: Tensor,
    square_weight: bool,
) -> None:
    """Writes ``W @ x + bias[:, None]`` (``W∘W`` if ``square_weight``) into ``y``.

    Args:
        values: ``[nnz, bm, bn]`` contiguous; float16, bfloat16, float32 or float64;
            ``bm`` and ``bn`` powers of two, at least 16.
        row_offsets, column_indices: int32 BSR metadata of ``W [M, K]``, trusted.
        x: ``[K, N]``, any strides, dtype of ``values``.
        bias: ``[M]`` contiguous or None.
        y: ``[M, N]``, any strides, dtype of ``values``; fully overwritten.
        square_weight: multiply by ``W∘W``.
    """
    _, bm, bn = values.shape
    m, n = y.shape
    if y.numel() == 0:
        return

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), m // min(meta["BLOCK_M"], bm)

    torch.library.wrap_triton(_bsr_mm_kernel)[grid](
        values, row_offsets, column_indices, x, bias if bias is not None else values, y,
        m, n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BM=bm, BN=bn,
        HAS_BIAS=bias is not None, SQUARE_WEIGHT=square_weight,
        ACC_DTYPE=accumulator_dtype(values.dtype), DOT_DTYPE=dot_operand_dtype(values.dtype),
    )


@torch.library.triton_op("pxkern::bsr_dense_mm_triton", mutates_args=())
def bsr_dense_mm_triton(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    x: Tensor,
    bias: Tensor | None,
    square_weight: bool,
) -> Tensor:
    """``W @ x + bias[:, None]`` for ``W [M, K] = shape`` in BSR form and ``x [K, N]``;
    inputs validated by :func:`pxkern.ops.bsr_dense_mm.bsr_dense_mm`. Returns ``[M, N]``."""
    y = x.new_empty((shape[0], x.shape[1]))
    launch_bsr_mm(values, row_offsets, column_indices, x, bias, y, square_weight)
    return y


@bsr_dense_mm_triton.register_fake
def _bsr_dense_mm_triton_fake(
    values: Tensor,
    row_offsets: Tensor,
    column_indices: Tensor,
    shape: list[int],
    x: Tensor,
    bias: Tensor | None,
    square_weight: bool,
) -> Tensor:
    # triton_op would trace the launcher itself, which fails when the kernel is
    # interpreted (the interpreter cannot run on fake tensors).
    return x.new_empty((shape[0], x.shape[1]))
