"""Triton kernels of the fused PX Conv2d layer: ``pxkern::px_conv2d_forward_triton`` and
``pxkern::px_conv2d_backward_triton`` (inputs validated by :mod:`pxkern.ops.px_conv2d`,
which states the math).

Every convolution is an implicit GEMM: each program gathers its input patches from the
input tensor by index arithmetic (zero padding is a load mask), so no im2col buffer is
ever written. groups=1, dilation=1, any kernel size, stride and zero padding.

Layout: tensors are addressed through their strides, so any memory format runs, but the
tiles are laid out for channels-last (NHWC), the layout the PX streams travel in
(:func:`pxkern.px.scaled.stream_layout`): the reduction walks kernel taps outer and
channels inner, so a ``[positions, channels]`` tile of one tap reads runs of contiguous
channels per position (coalesced and vectorized, since Triton specializes the unit
channel stride), and a ``[positions, Cout]`` output tile is stored contiguous along Cout.
In NCHW the channel tiles would stride by ``H*W`` and only stride-1 convolutions would
read positions contiguously. Outputs are allocated channels-last; NCHW inputs are read in
place through their strides (slower loads, no copy).

Notation for the costs: N samples of streams A and B, R samples of stream C (usually 1),
Cin -> Cout channels, H x W input, Ho x Wo output, kh x kw kernel, stride s;
``T = kh*kw`` taps, ``K = Cin*T``, ``P = Ho*Wo``; byte sizes ``e`` (x, u, weight, a, b),
``e_m`` (mask: 1 for bool, ``e`` otherwise, 0 without a mask), ``e_c`` (h, g, c, g_in)
and ``e_s`` (scores: 8 for float64 h, else 4); ``e_v`` for bias/scale/shift. Compulsory
bytes count each tensor once; "loaded" bytes count what the programs read (mostly from
L2): an input element is read once per tap that touches it and per column tile.

Kernel ``_forward_kernel`` (streams A, B, C of one layer, one pass over W and M)
    Inputs: x, u ``[N, Cin, H, W]``, h ``[R, Cin, H, W]``, weight/mask ``[Cout, Cin, kh,
    kw]``, bias/scale/shift ``[Cout]`` (optional), four float64 multipliers. Outputs:
    a, b ``[N, Cout, Ho, Wo]``, c ``[R, Cout, Ho, Wo]``, and ``max|b|`` (float32) and
    ``max|c|`` (C's accumulation dtype: a float64 C may leave float32's range) of the
    stored values, folded into two scalars with ``atomic_max`` (values are >= 0, and max
    is exact and order-free: deterministic, and autotuning's repeated launches leave
    them right).

    Tiling: GEMM rows are output positions ``(sample, ho, wo)``, columns are Cout, the
    reduction is (tap, Cin). Program ``(i, j)`` owns rows ``i*BLOCK_M ..`` and columns
    ``j*BLOCK_N ..``; per tap and ``BLOCK_K`` channels it loads one ``[BLOCK_K, BLOCK_N]``
    tile of W (and M) and forms ``W*M`` in registers; A accumulates ``x . W*M`` and B
    ``u . M`` (without a mask B's weight is all ones, so B is the patch sum of u, a row
    reduction instead of a product), both in float32.
    Stream C's rows are its R samples' positions: usually one sample, where A and B have
    N. Computing C in every program would repeat it N times; instead only the programs
    whose row tile falls inside C's ``R*P`` rows (the first ``ceil(R*P / BLOCK_M)`` row
    tiles; the grid covers ``max(N, R)*P`` rows) also accumulate ``h . (W*M)^2``,
    squaring the ``W*M`` tile they already hold: C is computed once, costs no second
    pass over W and M (a separate C grid would re-read them), and the other programs
    neither load h nor square. C accumulates in float64 for float64 h, else float32.
    Epilogue: bias (1 for B, bias^2 for C, in units of the offset scales), eval-BN
    affine, the gate ``a > 0`` (after the affine) on A and B; each output stored once.

    Cost: FLOPs ``2*N*P*Cout*K`` (A) + ``2*N*P*Cout*K`` (B; without a mask
    ``N*P*K*ceil(Cout/BLOCK_N)`` adds) + ``2*R*P*Cout*K`` (C) + ``Cout*K*(1 + 2*[C])``
    per row tile (W*M, its square) + ``~10*(N + R)*P*Cout`` (epilogues);
    bytes, compulsory: ``2*N*Cin*H*W*e + R*Cin*H*W*e_c + Cout*K*(e + e_m)
    + 2*N*P*Cout*e + R*P*Cout*e_c + 3*Cout*e_v``;
    bytes, loaded: W and M ``Cout*K*(e + e_m)*ceil(max(N, R)*P / BLOCK_M)``, x and u
    ``2*N*P*K*e*ceil(Cout/BLOCK_N)``, h ``R*P*K*e_c*ceil(Cout/BLOCK_N)``.

Kernel ``_input_grad_kernel`` (C's cotangent through the layer)
    ``g_in[r, ci, y, x] = sum_{co, i, j} g_pre[r, co, ho, wo] * (W*M)^2[co, ci, i, j]``
    over ``y = ho*s - p + i``, ``x = wo*s - p + j``, with ``g_pre = g * scale``: the
    transposed convolution as an implicit GEMM with rows = input positions ``(r, y,
    x)``, columns = Cin, reduction = (tap, Cout); ``(W*M)^2`` and ``g * scale`` are
    formed in registers. A tap reaches an input position only where ``y + p - i`` is a
    multiple of s inside the output: one tap in ``s^2``, the others are masked loads
    (they cost compute, not memory).
    Cost: FLOPs ``2*R*P*Cout*K`` useful, ``2*R*H*W*Cout*K`` issued, + ``2*Cout*K`` per
    row tile (the squares); bytes, compulsory: ``R*P*Cout*e_c + Cout*K*(e + e_m)
    + R*Cin*H*W*e_c + Cout*e_v``; loaded: W and M ``Cout*K*(e + e_m)*ceil(R*H*W /
    BLOCK_M)``, g ``R*H*W*Cout*T*e_c*ceil(Cin/BLOCK_N)`` (masked lanes included).

Kernel ``_score_kernel`` (the PX score)
    ``G[co, ci, i, j] = sum_{r, ho, wo} g_pre[r, co, ho, wo] * h[r, ci, ho*s - p + i,
    wo*s - p + j]``, ``scores = |G| * W^2 * M`` (float64 for float64 h, else float32).
    Grid: (Cout tiles, Cin tiles, taps); a program reduces over all ``R*P`` output
    positions with ``tl.dot``, applies the scale per output channel after the sum, and
    reads its ``[BLOCK_M, BLOCK_N]`` tile of W and M once, in the epilogue.
    A separate kernel from ``_input_grad_kernel``, launched right after it: g_in reduces
    over Cout and G over positions, so a program owning a W tile for both would have to
    sum partial g_in across Cout tiles (atomics or a partials buffer); the backward
    therefore reads W and M twice in all.
    Cost: FLOPs ``2*R*P*Cout*K + 4*Cout*K``; bytes, compulsory: ``R*P*Cout*e_c +
    R*Cin*H*W*e_c + Cout*K*(e + e_m + e_s) + Cout*e_v``; loaded: g
    ``R*P*Cout*e_c*T*ceil(Cin/BLOCK_N)``, h ``R*P*K*e_c*ceil(Cout/BLOCK_M)``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pxkern.kernels.triton.autotune import autotune_configs
from pxkern.kernels.triton.dtypes import accumulator_dtype, dot_operand_dtype
from pxkern.ops.px_layer_common import accumulation_dtype

__all__ = ["px_conv2d_backward_triton", "px_conv2d_forward_triton"]

def _configs(shapes: tuple[tuple[int, int, int, int, int], ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Forward: many output positions,
# Cout 16..2048; BLOCK_K 16 serves the first layer's 3 input channels.
_FORWARD_GPU_CONFIGS = _configs((
    (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3),
    (64, 32, 32, 4, 4), (32, 64, 64, 4, 4), (64, 64, 16, 4, 4), (128, 32, 64, 4, 3),
))
# Input gradient: rows are one sample's positions (R = 1), often 49..1024, so short row
# tiles give enough programs.
_INPUT_GRAD_GPU_CONFIGS = _configs((
    (32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (16, 64, 64, 4, 4), (32, 32, 64, 4, 4),
    (64, 128, 32, 4, 3), (16, 32, 64, 2, 4),
))
# Scores: a Cout x Cin tile per tap, reduced over one sample's positions.
_SCORE_GPU_CONFIGS = _configs((
    (64, 64, 32, 4, 3), (32, 64, 64, 4, 4), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3),
    (32, 32, 64, 4, 4), (16, 32, 64, 2, 4),
))
# 16-wide tiles leave partial row, column and channel tiles on the tests' small odd
# shapes, and the 32-row tile splits stream C's rows over several programs.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)


@triton.autotune(
    configs=autotune_configs(_FORWARD_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["rows", "cout", "cin", "taps"],
)
@triton.jit
def _forward_kernel(
    x_ptr, u_ptr, h_ptr, w_ptr, mask_ptr, bias_ptr, scale_ptr, shift_ptr,
    a_ptr, b_ptr, c_ptr, b_amax_ptr, c_amax_ptr,
    # float64: C's multipliers may lie outside float32's range (the exponents exist
    # because stream values do); Triton would pass Python floats as float32.
    u_scale: tl.float64, u_offset_scale: tl.float64, h_scale: tl.float64, h_offset_scale: tl.float64,
    batch, samples_c, rows, cin, in_h, in_w, cout, out_h, out_w, taps, kernel_w,
    stride_h, stride_w, pad_h, pad_w,
    sx_n, sx_c, sx_h, sx_w, su_n, su_c, su_h, su_w, sh_n, sh_c, sh_h, sh_w,
    sw_o, sw_i, sw_h, sw_w, sm_o, sm_i, sm_h, sm_w,
    sab_n, sab_c, sab_h, sab_w, sc_n, sc_c, sc_h, sc_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    positions = out_h * out_w
    first_row = tl.program_id(0) * BLOCK_M
    row = first_row + tl.arange(0, BLOCK_M)
    # int64: sample * (Cin*H*W) may pass 2**31 for large batches.
    sample = (row // positions).to(tl.int64)
    ho = (row % positions) // out_w
    wo = row % out_w
    channel_out = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    column = channel_out < cout
    rows_ab = batch * positions
    rows_c = samples_c * positions
    do_ab = first_row < rows_ab
    do_c = first_row < rows_c
    row_ab = row < rows_ab
    row_c = row < rows_c

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, BLOCK_N), dtype=C_DTYPE)
    for tap in range(taps):
        i = tap // kernel_w
        j = tap % kernel_w
        hi = ho * stride_h - pad_h + i
        wi = wo * stride_w - pad_w + j
        inside = (hi >= 0) & (hi < in_h) & (wi >= 0) & (wi < in_w)
        for c0 in range(0, cin, BLOCK_K):
            channel_in = c0 + tl.arange(0, BLOCK_K)
            reduce = channel_in < cin
            w_tile = reduce[:, None] & column[None, :]
            # W*M is formed in the dot's operand dtype (exact: M is 0/1), which sidesteps
            # the interpreter's broken bfloat16 arithmetic (see dot_operand_dtype).
            w = tl.load(
                w_ptr + channel_out[None, :] * sw_o + channel_in[:, None] * sw_i + i * sw_h + j * sw_w,
                mask=w_tile, other=0.0,
            ).to(DOT_DTYPE)
            if HAS_MASK:
                m = tl.load(
                    mask_ptr + channel_out[None, :] * sm_o + channel_in[:, None] * sm_i + i * sm_h + j * sm_w,
                    mask=w_tile, other=0,
                ).to(DOT_DTYPE)
                wm = w * m
            else:
                wm = w
            if do_ab:
                patch = (row_ab & inside)[:, None] & reduce[None, :]
                x = tl.load(
                    x_ptr + (sample * sx_n + hi * sx_h + wi * sx_w)[:, None] + channel_in[None, :] * sx_c,
                    mask=patch, other=0.0,
                )
                # "ieee": float32 inputs get float32 products (no TF32), as F.conv2d gives.
                acc_a = tl.dot(x.to(DOT_DTYPE), wm, acc_a, input_precision="ieee")
                u = tl.load(
                    u_ptr + (sample * su_n + hi * su_h + wi * su_w)[:, None] + channel_in[None, :] * su_c,
                    mask=patch, other=0.0,
                )
                if HAS_MASK:
                    acc_b = tl.dot(u.to(DOT_DTYPE), m, acc_b, input_precision="ieee")
                else:
                    acc_b += tl.sum(u.to(tl.float32), axis=1)[:, None]
            if do_c:
                h = tl.load(
                    h_ptr + (sample * sh_n + hi * sh_h + wi * sh_w)[:, None] + channel_in[None, :] * sh_c,
                    mask=(row_c & inside)[:, None] & reduce[None, :], other=0.0,
                ).to(C_DTYPE)
                wm_c = wm.to(C_DTYPE)
                acc_c = tl.dot(h, wm_c * wm_c, acc_c, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel_out, mask=column, other=0.0)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + channel_out, mask=column, other=0.0)
        shift = tl.load(shift_ptr + channel_out, mask=column, other=0.0)
    if do_ab:
        u_offset = tl.cast(u_offset_scale, tl.float32)
        a = acc_a
        b = acc_b * tl.cast(u_scale, tl.float32)
        if HAS_BIAS:
            a += bias.to(tl.float32)[None, :]
            b += u_offset
        if HAS_AFFINE:
            a = a * scale.to(tl.float32)[None, :] + shift.to(tl.float32)[None, :]
            b = b * scale.to(tl.float32)[None, :] + (shift.to(tl.float32) * u_offset)[None, :]
        if RELU:
            gate = a > 0
            a = tl.where(gate, a, 0.0)
            b = tl.where(gate, b, 0.0)
        out = row_ab[:, None] & column[None, :]
        ab_offsets = (sample * sab_n + ho * sab_h + wo * sab_w)[:, None] + channel_out[None, :] * sab_c
        tl.store(a_ptr + ab_offsets, a.to(a_ptr.dtype.element_ty), mask=out)
        b = b.to(b_ptr.dtype.element_ty)
        tl.store(b_ptr + ab_offsets, b, mask=out)
        tl.atomic_max(b_amax_ptr, tl.max(tl.where(out, tl.abs(b.to(tl.float32)), 0.0)))
    if do_c:
        h_offset = tl.cast(h_offset_scale, C_DTYPE)
        c = acc_c * tl.cast(h_scale, C_DTYPE)
        if HAS_BIAS:
            bias_c = bias.to(C_DTYPE)
            c += (bias_c * bias_c * h_offset)[None, :]
        if HAS_AFFINE:
            c = c * scale.to(C_DTYPE)[None, :] + (shift.to(C_DTYPE) * h_offset)[None, :]
        out = row_c[:, None] & column[None, :]
        c_offsets = (sample * sc_n + ho * sc_h + wo * sc_w)[:, None] + channel_out[None, :] * sc_c
        c = c.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + c_offsets, c, mask=out)
        tl.atomic_max(c_amax_ptr, tl.max(tl.where(out, tl.abs(c.to(C_DTYPE)), 0.0)))


@triton.autotune(
    configs=autotune_configs(_INPUT_GRAD_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["rows", "cin", "cout", "taps"],
)
@triton.jit
def _input_grad_kernel(
    g_ptr, w_ptr, mask_ptr, scale_ptr, g_in_ptr,
    rows, cin, in_h, in_w, cout, out_h, out_w, taps, kernel_w,
    stride_h, stride_w, pad_h, pad_w,
    sg_n, sg_c, sg_h, sg_w, sw_o, sw_i, sw_h, sw_w, sm_o, sm_i, sm_h, sm_w,
    si_n, si_c, si_h, si_w,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, C_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pixels = in_h * in_w
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sample = (row // pixels).to(tl.int64)
    y = (row % pixels) // in_w
    x = row % in_w
    in_rows = row < rows
    channel_in = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    column = channel_in < cin

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=C_DTYPE)
    for tap in range(taps):
        i = tap // kernel_w
        j = tap % kernel_w
        # Output position (ho, wo) read this input pixel through tap (i, j) iff
        # ho*s - p + i = y, i.e. y + p - i is a non-negative multiple of s below Ho*s.
        ho_s = y + pad_h - i
        wo_s = x + pad_w - j
        ho = ho_s // stride_h
        wo = wo_s // stride_w
        hit = (in_rows & (ho_s >= 0) & (wo_s >= 0) & (ho_s % stride_h == 0) & (wo_s % stride_w == 0)
               & (ho < out_h) & (wo < out_w))
        for co0 in range(0, cout, BLOCK_K):
            channel_out = co0 + tl.arange(0, BLOCK_K)
            reduce = channel_out < cout
            g = tl.load(
                g_ptr + (sample * sg_n + ho * sg_h + wo * sg_w)[:, None] + channel_out[None, :] * sg_c,
                mask=hit[:, None] & reduce[None, :], other=0.0,
            ).to(C_DTYPE)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr + channel_out, mask=reduce, other=0.0).to(C_DTYPE)[None, :]
            w_tile = reduce[:, None] & column[None, :]
            w = tl.load(
                w_ptr + channel_out[:, None] * sw_o + channel_in[None, :] * sw_i + i * sw_h + j * sw_w,
                mask=w_tile, other=0.0,
            ).to(C_DTYPE)
            if HAS_MASK:
                w = w * tl.load(
                    mask_ptr + channel_out[:, None] * sm_o + channel_in[None, :] * sm_i + i * sm_h + j * sm_w,
                    mask=w_tile, other=0,
                ).to(C_DTYPE)
            acc = tl.dot(g, w * w, acc, input_precision="ieee")

    offsets = (sample * si_n + y * si_h + x * si_w)[:, None] + channel_in[None, :] * si_c
    tl.store(g_in_ptr + offsets, acc.to(g_in_ptr.dtype.element_ty), mask=in_rows[:, None] & column[None, :])


@triton.autotune(
    configs=autotune_configs(_SCORE_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=["reduction", "cout", "cin", "taps"],
)
@triton.jit
def _score_kernel(
    g_ptr, h_ptr, w_ptr, mask_ptr, scale_ptr, score_ptr,
    reduction, cin, in_h, in_w, cout, out_h, out_w, taps, kernel_w,
    stride_h, stride_w, pad_h, pad_w,
    sg_n, sg_c, sg_h, sg_w, sh_n, sh_c, sh_h, sh_w,
    sw_o, sw_i, sw_h, sw_w, sm_o, sm_i, sm_h, sm_w, ss_o, ss_i, ss_h, ss_w,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, C_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    channel_out = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    channel_in = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tap = tl.program_id(2)
    i = tap // kernel_w
    j = tap % kernel_w
    rows = channel_out < cout
    column = channel_in < cin
    positions = out_h * out_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=C_DTYPE)
    for p0 in range(0, reduction, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        sample = (p // positions).to(tl.int64)
        ho = (p % positions) // out_w
        wo = p % out_w
        hi = ho * stride_h - pad_h + i
        wi = wo * stride_w - pad_w + j
        in_reduction = p < reduction
        inside = in_reduction & (hi >= 0) & (hi < in_h) & (wi >= 0) & (wi < in_w)
        g = tl.load(
            g_ptr + channel_out[:, None] * sg_c + (sample * sg_n + ho * sg_h + wo * sg_w)[None, :],
            mask=rows[:, None] & in_reduction[None, :], other=0.0,
        ).to(C_DTYPE)
        h = tl.load(
            h_ptr + (sample * sh_n + hi * sh_h + wi * sh_w)[:, None] + channel_in[None, :] * sh_c,
            mask=inside[:, None] & column[None, :], other=0.0,
        ).to(C_DTYPE)
        acc = tl.dot(g, h, acc, input_precision="ieee")

    # g * scale per output channel commutes with the sum over positions.
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + channel_out, mask=rows, other=0.0).to(C_DTYPE)[:, None]
    tile = rows[:, None] & column[None, :]
    w = tl.load(
        w_ptr + channel_out[:, None] * sw_o + channel_in[None, :] * sw_i + i * sw_h + j * sw_w,
        mask=tile, other=0.0,
    ).to(C_DTYPE)
    score = tl.abs(acc) * w * w
    if HAS_MASK:
        score = score * tl.load(
            mask_ptr + channel_out[:, None] * sm_o + channel_in[None, :] * sm_i + i * sm_h + j * sm_w,
            mask=tile, other=0,
        ).to(C_DTYPE)
    offsets = channel_out[:, None] * ss_o + channel_in[None, :] * ss_i + i * ss_h + j * ss_w
    tl.store(score_ptr + offsets, score.to(score_ptr.dtype.element_ty), mask=tile)


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _loadable_mask(mask: Tensor | None) -> Tensor | None:
    # Triton loads bool tensors as i1; the same bytes as uint8 load as plain 0/1 integers.
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _strides_or_zeros(t: Tensor | None) -> tuple[int, ...]:
    return t.stride() if t is not None else (0, 0, 0, 0)


def _forward_outputs(
    x: Tensor, h: Tensor, weight: Tensor, stride: list[int], padding: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Uninitialized a, b, c (channels-last) and zeroed ``max|b|`` (float32) and
    ``max|c|`` (C's accumulation dtype) scalars, as the kernel writes them."""
    n, _, in_h, in_w = x.shape
    cout, _, kh, kw = weight.shape
    out_h = _output_size(in_h, kh, stride[0], padding[0])
    out_w = _output_size(in_w, kw, stride[1], padding[1])

    def channels_last(like: Tensor, rows: int) -> Tensor:
        return torch.empty((rows, cout, out_h, out_w), dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last)

    a, b, c = channels_last(x, n), channels_last(x, n), channels_last(h, h.shape[0])
    b_amax = x.new_zeros((), dtype=torch.float32)
    c_amax = h.new_zeros((), dtype=accumulation_dtype(h.dtype))
    return a, b, c, b_amax, c_amax


@torch.library.triton_op("pxkern::px_conv2d_forward_triton", mutates_args=())
def px_conv2d_forward_triton(
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
    stride: list[int],
    padding: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Streams A, B, C of one Conv2d layer in one launch; arguments validated by
    :func:`pxkern.ops.px_conv2d.px_conv2d_forward`. Returns ``(a, b, c, b_amax, c_amax)``."""
    a, b, c, b_amax, c_amax = _forward_outputs(x, h, weight, stride, padding)
    n, cin, in_h, in_w = x.shape
    samples_c = h.shape[0]
    cout, _, kh, kw = weight.shape
    _, _, out_h, out_w = a.shape
    rows = max(n, samples_c) * out_h * out_w
    mask = _loadable_mask(mask)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"])

    torch.library.wrap_triton(_forward_kernel)[grid](
        x, u, h, weight, mask, bias, scale, shift,
        a, b, c, b_amax, c_amax,
        u_scale, u_offset_scale, h_scale, h_offset_scale,
        n, samples_c, rows, cin, in_h, in_w, cout, out_h, out_w, kh * kw, kw,
        stride[0], stride[1], padding[0], padding[1],
        *x.stride(), *u.stride(), *h.stride(), *weight.stride(), *_strides_or_zeros(mask),
        *a.stride(), *c.stride(),
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, HAS_AFFINE=scale is not None, RELU=relu,
        DOT_DTYPE=dot_operand_dtype(x.dtype), C_DTYPE=accumulator_dtype(h.dtype),
    )
    return a, b, c, b_amax, c_amax


@px_conv2d_forward_triton.register_fake
def _px_conv2d_forward_triton_fake(
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
    stride: list[int],
    padding: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # triton_op would trace the launcher itself, which the interpreter cannot run on
    # fake tensors.
    return _forward_outputs(x, h, weight, stride, padding)


def _backward_outputs(h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialized g_in (channels-last, h's dtype) and scores (contiguous, float32 or
    float64 like h's accumulation)."""
    g_in = torch.empty_like(h, memory_format=torch.channels_last)
    scores = weight.new_empty(weight.shape, dtype=accumulation_dtype(h.dtype))
    return g_in, scores


@torch.library.triton_op("pxkern::px_conv2d_backward_triton", mutates_args=())
def px_conv2d_backward_triton(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    scale: Tensor | None,
    stride: list[int],
    padding: list[int],
) -> tuple[Tensor, Tensor]:
    """Stream C's input cotangent and the PX scores of one Conv2d layer (two launches);
    arguments validated by :func:`pxkern.ops.px_conv2d.px_conv2d_backward`. Returns
    ``(g_in, scores)``."""
    g_in, scores = _backward_outputs(h, weight)
    samples, cin, in_h, in_w = h.shape
    cout, _, kh, kw = weight.shape
    _, _, out_h, out_w = g.shape
    taps = kh * kw
    mask = _loadable_mask(mask)
    common = {
        "HAS_MASK": mask is not None, "HAS_SCALE": scale is not None,
        "C_DTYPE": accumulator_dtype(h.dtype),
    }
    rows = samples * in_h * in_w

    def input_grad_grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cin, meta["BLOCK_N"])

    torch.library.wrap_triton(_input_grad_kernel)[input_grad_grid](
        g, weight, mask, scale, g_in,
        rows, cin, in_h, in_w, cout, out_h, out_w, taps, kw,
        stride[0], stride[1], padding[0], padding[1],
        *g.stride(), *weight.stride(), *_strides_or_zeros(mask), *g_in.stride(),
        **common,
    )

    def score_grid(meta):
        return triton.cdiv(cout, meta["BLOCK_M"]), triton.cdiv(cin, meta["BLOCK_N"]), taps

    torch.library.wrap_triton(_score_kernel)[score_grid](
        g, h, weight, mask, scale, scores,
        samples * out_h * out_w, cin, in_h, in_w, cout, out_h, out_w, taps, kw,
        stride[0], stride[1], padding[0], padding[1],
        *g.stride(), *h.stride(), *weight.stride(), *_strides_or_zeros(mask), *scores.stride(),
        **common,
    )
    return g_in, scores


@px_conv2d_backward_triton.register_fake
def _px_conv2d_backward_triton_fake(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    scale: Tensor | None,
    stride: list[int],
    padding: list[int],
) -> tuple[Tensor, Tensor]:
    # As for the forward: the interpreter cannot trace the launcher.
    return _backward_outputs(h, weight)
