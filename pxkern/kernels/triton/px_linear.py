"""Triton kernels of the fused PX Linear layer: ``pxkern::px_linear_forward_triton`` (the
three streams of one layer in one pass over the weight) and
``pxkern::px_linear_backward_triton`` (stream C's input cotangent and the PX scores in
one more pass). The math is in :mod:`pxkern.ops.px_linear`; shapes below use
``x, u [N, K]``, ``h [R, K]``, ``W, mask [M, K]``, and ``s`` bytes per element of x/u/W,
``s_m`` of the mask, ``s_c`` of h/g, ``s_acc`` of stream C's accumulator (4, or 8 for
float64 h).

Kernel ``_px_linear_forward_kernel``
    Inputs: x, u, h, W, mask (optional; bool or W's dtype), bias, BatchNorm-folded
    scale/shift ``[M]`` (optional), four float64 stream multipliers. Outputs:
    ``a = relu?((x (W*M)^T + bias) * scale + shift)``, ``b`` (stream B, gated by ``a``),
    ``c [R, M]`` (stream C), and ``max|b|``, ``max|c|``.

    Tiling: program ``(i, j)`` owns output columns ``j*BLOCK_M ..``; it computes the A
    and B rows ``i*BLOCK_N ..`` and the C rows ``i*BLOCK_R ..`` (the grid's first axis
    covers both). Per ``BLOCK_K`` step it loads one tile of W and of the mask and uses it
    three times: ``tl.dot`` with x (A), the mask with u (B; without a mask B's weight is
    all ones and its rows are sums of u), and ``(W*M)^2`` formed in registers with h (C).
    C is computed only by the programs that own C rows, i.e. for the usual ``R <= BLOCK_R``
    the first row of programs: C needs each weight squared once, so the other programs
    neither load h nor square, and C costs no extra pass over W (a separate C grid would
    re-read all of W). When C has more row tiles than A and B (rare: C has one sample's
    rows, A and B a batch of them), the extra programs own no A/B rows: their loads are
    masked off and their A/B dots run on zeros. ``R == 1`` is a matrix-vector product
    done as a reduction (``tl.dot`` needs 16 rows); ``R > 1`` is a ``tl.dot`` on
    ``BLOCK_R = 16..64`` rows. A and B accumulate in float32, with ``"ieee"`` float32
    products (TF32 would move A's gates away from the model's own ``F.linear``), C in
    float32 or float64 (float64 h). The epilogue adds bias, applies the affine and the
    gate, stores a/b/c in their dtypes and folds ``max|b|``/``max|c|`` of the stored
    values into two scalars with ``tl.atomic_max`` (values are >= 0; max is idempotent,
    so autotuning's repeated launches leave them right).

    Cost per call (``d_N = ceil(N / BLOCK_N)``, ``d_M = ceil(M / BLOCK_M)``,
    ``R' = R`` for ``R == 1`` else ``R`` rounded up to ``BLOCK_R``):
      FLOPs: ``2*N*M*K`` (A) + ``2*N*M*K`` (B; ``N*K*d_M`` row sums without a mask)
      + ``2*R'*M*K + M*K`` (C and its squares) + ``O((N + R)*M)`` epilogue;
      bytes, compulsory: ``(2*N*K + M*K)*s + M*K*s_m + R*K*s_c + 2*N*M*s + R*M*s_c``
      + ``M*(s_bias + 2*s_affine)``;
      bytes, loaded by the programs (L2 traffic): W and mask ``M*K*(s + s_m)*G_N`` with
      ``G_N = max(d_N, ceil(R / BLOCK_R))`` the grid's first axis, x and u
      ``2*N*K*s*d_M``, h ``R*K*s_c*d_M``.

Kernel ``_px_linear_backward_kernel``
    Inputs: ``g [R, M]`` (C's cotangent after the affine), ``h [R, K]``, W, mask and
    scale ``[M]`` (optional). Outputs: ``scores [M, K] = |g_pre^T h| * (W*M)^2`` and the
    partial sums of ``g_in = g_pre (W*M)^2 [R, K]`` per chunk of W's rows, with
    ``g_pre = g * scale``.

    Tiling: program ``(j, c, t)`` owns the input columns ``j*BLOCK_K ..``, the chunk
    ``c`` of ``rows_per_program`` weight rows (a multiple of every config's BLOCK_M) and
    the R rows ``t*BLOCK_R ..`` of ``g_in``. It walks its chunk in BLOCK_M steps: one
    load of the W and mask tile, squared in registers, gives the score tile (an outer
    product for ``R == 1``, a ``tl.dot`` over R otherwise; programs with ``t == 0``
    only, the score sums over all of R) and the tile's contribution to ``g_in``, kept in
    registers across the chunk. The chunks' partial ``g_in`` are summed by a second,
    small reduction (``torch.sum`` over ``[chunks, R, K]``) rather than by atomics: the
    result is deterministic, and the chunking keeps the partials at most 1/8 of W's size
    while the grid has ``ceil(K / BLOCK_K) * ceil(M / rows_per_program)`` programs,
    enough to keep a GPU's memory system busy on this memory-bound pass. ``R > 64``
    splits R over the third grid axis; each R tile re-reads W.

    Cost per call (``T_R = ceil(R / BLOCK_R)``, ``C = ceil(M / rows_per_program)``):
      FLOPs: ``2*R'*M*K`` (scores) + ``2*R'*M*K`` (g_in) + ``4*M*K`` (squares, |.|, product);
      bytes, compulsory: ``M*K*(s + s_m + s_acc) + R*(M + K)*s_c + M*s_scale``
      + ``2*C*R*K*s_acc`` (partials written, then read by the reduction) + ``R*K*s_c``;
      bytes, loaded by the programs: W and mask ``M*K*(s + s_m)*T_R``, g
      ``2*R*M*s_c*ceil(K / BLOCK_K)`` (for g_in, and again for the scores), h
      ``R*K*s_c*ceil(M / BLOCK_M)``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pxkern.kernels.triton.autotune import autotune_configs
from pxkern.kernels.triton.dtypes import accumulator_dtype, dot_operand_dtype
from pxkern.ops.px_layer_common import accumulation_dtype

__all__ = ["px_linear_backward_triton", "px_linear_forward_triton"]

# R rows of stream C per tile: one row is a reduction, more go to tl.dot, which needs at
# least 16; beyond 64 the accumulators would crowd the registers, so R is tiled.
_MAX_BLOCK_R = 64

# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages). Two [BLOCK_N, BLOCK_M]
# accumulators (A and B) halve the tile a single GEMM would afford; small BLOCK_N serves
# batch-1 and small-batch layers.
_FORWARD_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
    for n, m, k, warps, stages in (
        (16, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
    )
]
# 16 x 16 x 32 tiles leave several N, M and K tiles, partial ones included, for the odd
# shapes of the interpreted tests.
_FORWARD_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_K, num_warps, num_stages): a streaming pass over W.
_BACKWARD_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
    for m, k, warps, stages in (
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (32, 128, 4, 3),
        (64, 128, 8, 3),
        (128, 64, 8, 2),
    )
]
_BACKWARD_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_BACKWARD_CONFIGS = autotune_configs(_BACKWARD_GPU_CONFIGS, _BACKWARD_INTERPRETER_CONFIG)
# Chunks of weight rows are whole BLOCK_M steps for every config.
_ROWS_PER_PROGRAM_UNIT = max(config.kwargs["BLOCK_M"] for config in _BACKWARD_CONFIGS)


def _block_r(rows: int) -> int:
    """Rows of stream C per tile: 1 for one row, else a power of two in [16, 64]."""
    return 1 if rows == 1 else min(max(16, triton.next_power_of_2(rows)), _MAX_BLOCK_R)


@triton.jit
def _rows_times(rows, matrix, BLOCK_R: tl.constexpr):
    """``rows [BLOCK_R, X] @ matrix [X, Y]``: a column reduction for one row, else tl.dot."""
    if BLOCK_R == 1:
        return tl.sum(tl.trans(rows) * matrix, axis=0)[None, :]
    else:
        return tl.dot(rows, matrix, input_precision="ieee")


@triton.jit
def _sum_of_row_outer_products(left, right, BLOCK_R: tl.constexpr):
    """``left [BLOCK_R, X]^T @ right [BLOCK_R, Y]``: an outer product for one row, else tl.dot."""
    if BLOCK_R == 1:
        return tl.trans(left) * right
    else:
        return tl.dot(tl.trans(left), right, input_precision="ieee")


@triton.jit
def _masked_weight_tile(w_ptr, mask_ptr, rows, cols, row_ok, col_ok,
                        stride_wm, stride_wk, stride_mm, stride_mk, HAS_MASK: tl.constexpr):
    """``(W*M)[rows, cols]`` and ``M[rows, cols] != 0`` (all true without a mask), both
    zero outside the weight."""
    in_bounds = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wk, mask=in_bounds, other=0.0)
    keep = in_bounds
    if HAS_MASK:
        # Compared in float32: the interpreter compares bfloat16 tensors wrongly (triton 3.9).
        keep = tl.load(mask_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mk,
                       mask=in_bounds, other=0).to(tl.float32) != 0
        # A select, not a product: the mask is 0/1 and this keeps W's dtype exactly.
        w = tl.where(keep, w, 0.0)
    return w, keep


@triton.jit
def _atomic_max_abs(amax_ptr, values, valid):
    """Folds ``max |values|`` over the valid entries into the scalar at ``amax_ptr``."""
    magnitude = tl.where(valid, tl.abs(values), 0.0)
    tl.atomic_max(amax_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))


@triton.autotune(
    configs=autotune_configs(_FORWARD_GPU_CONFIGS, _FORWARD_INTERPRETER_CONFIG),
    key=["N", "M", "K", "R"],
)
@triton.jit
def _px_linear_forward_kernel(
    x_ptr, u_ptr, h_ptr, w_ptr, mask_ptr, bias_ptr, scale_ptr, shift_ptr,
    a_ptr, b_ptr, c_ptr, b_amax_ptr, c_amax_ptr,
    N, M, K, R,
    stride_xn, stride_xk, stride_un, stride_uk, stride_hr, stride_hk,
    stride_wm, stride_wk, stride_mm, stride_mk,
    # float64: C's multipliers may lie outside float32's range (the exponents exist
    # because stream values do).
    u_scale: tl.float64, u_offset_scale: tl.float64, h_scale: tl.float64, h_offset_scale: tl.float64,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    # int64 row indices: N * K or M * K may pass 2**31 elements.
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_rows = pid_n.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    outs = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, c_row_ok, out_ok = rows < N, c_rows < R, outs < M
    owns_c_rows = pid_n * BLOCK_R < R

    acc_a = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_R, BLOCK_M), dtype=C_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w, keep = _masked_weight_tile(w_ptr, mask_ptr, outs, ks, out_ok, k_ok,
                                      stride_wm, stride_wk, stride_mm, stride_mk, HAS_MASK)
        xu_ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk, mask=xu_ok, other=0.0)
        u = tl.load(u_ptr + rows[:, None] * stride_un + ks[None, :] * stride_uk, mask=xu_ok, other=0.0)
        acc_a = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc_a, input_precision="ieee")
        if HAS_MASK:
            acc_b = tl.dot(u.to(DOT_DTYPE), tl.trans(keep.to(DOT_DTYPE)), acc_b, input_precision="ieee")
        else:
            acc_b += tl.sum(u.to(tl.float32), axis=1)[:, None]
        if owns_c_rows:
            h = tl.load(h_ptr + c_rows[:, None] * stride_hr + ks[None, :] * stride_hk,
                        mask=c_row_ok[:, None] & k_ok[None, :], other=0.0)
            w_c = w.to(C_DTYPE)
            acc_c += _rows_times(h.to(C_DTYPE), tl.trans(w_c * w_c), BLOCK_R)

    # Epilogue of A and B, in float32.
    a = acc_a
    b = acc_b * tl.cast(u_scale, tl.float32)
    u_offset = tl.cast(u_offset_scale, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=out_ok, other=0.0)
        a += bias.to(tl.float32)[None, :]
        b += u_offset
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + outs, mask=out_ok, other=0.0)
        shift = tl.load(shift_ptr + outs, mask=out_ok, other=0.0)
        a = a * scale.to(tl.float32)[None, :] + shift.to(tl.float32)[None, :]
        b = b * scale.to(tl.float32)[None, :] + (shift.to(tl.float32) * u_offset)[None, :]
    if RELU:
        gate = a > 0
        a = tl.where(gate, a, 0.0)
        # A product like the CPU path's, so a non-finite b stays visible.
        b = b * gate.to(tl.float32)
    ab_ok = row_ok[:, None] & out_ok[None, :]
    ab_offsets = rows[:, None] * M + outs[None, :]
    tl.store(a_ptr + ab_offsets, a.to(a_ptr.dtype.element_ty), mask=ab_ok)
    b_stored = b.to(b_ptr.dtype.element_ty)
    tl.store(b_ptr + ab_offsets, b_stored, mask=ab_ok)
    _atomic_max_abs(b_amax_ptr, b_stored.to(tl.float32), ab_ok)

    if owns_c_rows:
        # Epilogue of C, in its accumulation dtype.
        h_offset = tl.cast(h_offset_scale, C_DTYPE)
        c = acc_c * tl.cast(h_scale, C_DTYPE)
        if HAS_BIAS:
            bias_c = bias.to(C_DTYPE)
            c += (bias_c * bias_c * h_offset)[None, :]
        if HAS_AFFINE:
            c = c * scale.to(C_DTYPE)[None, :] + (shift.to(C_DTYPE) * h_offset)[None, :]
        c_ok = c_row_ok[:, None] & out_ok[None, :]
        c_stored = c.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + c_rows[:, None] * M + outs[None, :], c_stored, mask=c_ok)
        _atomic_max_abs(c_amax_ptr, c_stored.to(tl.float32), c_ok)


@triton.jit
def _scaled_cotangent_tile(g_ptr, scale_ptr, r_rows, outs, r_ok, out_ok, stride_gr, stride_gm,
                           HAS_SCALE: tl.constexpr, C_DTYPE: tl.constexpr):
    """``(g * scale)[r_rows, outs]`` in C's accumulation dtype, zero outside."""
    g = tl.load(g_ptr + r_rows[:, None] * stride_gr + outs[None, :] * stride_gm,
                mask=r_ok[:, None] & out_ok[None, :], other=0.0).to(C_DTYPE)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + outs, mask=out_ok, other=0.0).to(C_DTYPE)[None, :]
    return g


@triton.autotune(configs=_BACKWARD_CONFIGS, key=["M", "K", "R"])
@triton.jit
def _px_linear_backward_kernel(
    g_ptr, h_ptr, w_ptr, mask_ptr, scale_ptr, scores_ptr, g_in_parts_ptr,
    M, K, R, rows_per_program,
    stride_gr, stride_gm, stride_hr, stride_hk,
    stride_wm, stride_wk, stride_mm, stride_mk,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, C_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    chunk = tl.program_id(1)
    r_tile = tl.program_id(2)
    r_rows = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok, r_ok = ks < K, r_rows < R
    chunk_start = chunk.to(tl.int64) * rows_per_program
    chunk_end = tl.minimum(chunk_start + rows_per_program, M)

    acc_g_in = tl.zeros((BLOCK_R, BLOCK_K), dtype=C_DTYPE)
    for m0 in range(chunk_start, chunk_end, BLOCK_M):
        outs = m0 + tl.arange(0, BLOCK_M)
        out_ok = outs < chunk_end
        w, _ = _masked_weight_tile(w_ptr, mask_ptr, outs, ks, out_ok, k_ok,
                                   stride_wm, stride_wk, stride_mm, stride_mk, HAS_MASK)
        w_c = w.to(C_DTYPE)
        squared = w_c * w_c
        g = _scaled_cotangent_tile(g_ptr, scale_ptr, r_rows, outs, r_ok, out_ok,
                                   stride_gr, stride_gm, HAS_SCALE, C_DTYPE)
        acc_g_in += _rows_times(g, squared, BLOCK_R)
        if r_tile == 0:
            gradient = tl.zeros((BLOCK_M, BLOCK_K), dtype=C_DTYPE)
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                rs_ok = rs < R
                g_rows = _scaled_cotangent_tile(g_ptr, scale_ptr, rs, outs, rs_ok, out_ok,
                                                stride_gr, stride_gm, HAS_SCALE, C_DTYPE)
                h_rows = tl.load(h_ptr + rs[:, None] * stride_hr + ks[None, :] * stride_hk,
                                 mask=rs_ok[:, None] & k_ok[None, :], other=0.0).to(C_DTYPE)
                gradient += _sum_of_row_outer_products(g_rows, h_rows, BLOCK_R)
            # |G| * W^2 * M: the masked square is W^2 * M since M is 0/1.
            tl.store(scores_ptr + outs[:, None] * K + ks[None, :], tl.abs(gradient) * squared,
                     mask=out_ok[:, None] & k_ok[None, :])
    parts_offsets = (chunk.to(tl.int64) * R + r_rows[:, None]) * K + ks[None, :]
    tl.store(g_in_parts_ptr + parts_offsets, acc_g_in, mask=r_ok[:, None] & k_ok[None, :])


def _optional(tensor: Tensor | None, placeholder: Tensor) -> Tensor:
    """A pointer argument for an absent optional tensor (never read: its flag is off)."""
    return placeholder if tensor is None else tensor


def _forward_outputs(x: Tensor, h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Uninitialized ``a, b [N, M]``, ``c [R, M]`` and zeroed float32 ``b_amax``/``c_amax``."""
    n, m, r = x.shape[0], weight.shape[0], h.shape[0]
    b_amax, c_amax = (x.new_zeros((), dtype=torch.float32) for _ in range(2))
    return x.new_empty((n, m)), x.new_empty((n, m)), h.new_empty((r, m)), b_amax, c_amax


@torch.library.triton_op("pxkern::px_linear_forward_triton", mutates_args=())
def px_linear_forward_triton(
    x: Tensor,
    u: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    relu: bool,
    u_scale: float,
    u_offset_scale: float,
    h_scale: float,
    h_offset_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Streams A, B, C of a Linear layer; inputs validated by
    :func:`pxkern.ops.px_linear.px_linear_forward`, which documents them. Returns
    ``(a [N, M], b [N, M], c [R, M], b_amax, c_amax)``."""
    a, b, c, b_amax, c_amax = _forward_outputs(x, h, weight)
    n, k = x.shape
    m, r = weight.shape[0], h.shape[0]
    block_r = _block_r(r)
    mask_arg = _optional(mask, weight)

    def grid(meta):
        return max(triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(r, block_r)), triton.cdiv(m, meta["BLOCK_M"])

    torch.library.wrap_triton(_px_linear_forward_kernel)[grid](
        x, u, h, weight, mask_arg, _optional(bias, weight), _optional(scale, weight), _optional(shift, weight),
        a, b, c, b_amax, c_amax,
        n, m, k, r,
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), h.stride(0), h.stride(1),
        weight.stride(0), weight.stride(1), mask_arg.stride(0), mask_arg.stride(1),
        u_scale, u_offset_scale, h_scale, h_offset_scale,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, HAS_AFFINE=scale is not None, RELU=relu,
        DOT_DTYPE=dot_operand_dtype(x.dtype), C_DTYPE=accumulator_dtype(h.dtype), BLOCK_R=block_r,
    )
    return a, b, c, b_amax, c_amax


@px_linear_forward_triton.register_fake
def _px_linear_forward_triton_fake(x, u, h, weight, mask, bias, scale, shift, relu,
                                   u_scale, u_offset_scale, h_scale, h_offset_scale):
    # triton_op would trace the launcher itself, which the interpreter cannot run on
    # fake tensors.
    return _forward_outputs(x, h, weight)


def _rows_per_program(rows: int) -> int:
    """Weight rows per backward program: at least 8 per R row, so that the partial sums
    of g_in (R rows per chunk) stay within 1/8 of W's size."""
    return _ROWS_PER_PROGRAM_UNIT * triton.cdiv(rows, 16)


@torch.library.triton_op("pxkern::px_linear_backward_triton", mutates_args=())
def px_linear_backward_triton(
    g: Tensor, h: Tensor, weight: Tensor, mask: Tensor | None, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Stream C's input cotangent and the PX scores of a Linear layer; inputs validated
    by :func:`pxkern.ops.px_linear.px_linear_backward`, which documents them. Returns
    ``(g_in [R, K] in h's dtype, scores [M, K] in h's accumulation dtype)``."""
    r, m = g.shape
    k = h.shape[1]
    acc_dtype = accumulation_dtype(h.dtype)
    rows_per_program = _rows_per_program(r)
    chunks = triton.cdiv(m, rows_per_program)
    block_r = _block_r(r)
    scores = weight.new_empty((m, k), dtype=acc_dtype)
    g_in_parts = weight.new_empty((chunks, r, k), dtype=acc_dtype)
    mask_arg = _optional(mask, weight)

    def grid(meta):
        return triton.cdiv(k, meta["BLOCK_K"]), chunks, triton.cdiv(r, block_r)

    torch.library.wrap_triton(_px_linear_backward_kernel)[grid](
        g, h, weight, mask_arg, _optional(scale, weight), scores, g_in_parts,
        m, k, r, rows_per_program,
        g.stride(0), g.stride(1), h.stride(0), h.stride(1),
        weight.stride(0), weight.stride(1), mask_arg.stride(0), mask_arg.stride(1),
        HAS_MASK=mask is not None, HAS_SCALE=scale is not None,
        C_DTYPE=accumulator_dtype(h.dtype), BLOCK_R=block_r,
    )
    g_in = g_in_parts[0] if chunks == 1 else g_in_parts.sum(0)
    return g_in.to(h.dtype), scores


@px_linear_backward_triton.register_fake
def _px_linear_backward_triton_fake(g, h, weight, mask, scale):
    acc_dtype = accumulation_dtype(h.dtype)
    return h.new_empty(h.shape), weight.new_empty(weight.shape, dtype=acc_dtype)
