"""Roofline estimates of pxkern's Triton kernels on an H100 SXM, against the unfused PyTorch
sequences they replace. ESTIMATES, NOT MEASUREMENTS: this project's machines have no GPU;
every number comes from counting FLOPs and bytes (docs/gpu-performance.md explains them).

Model. Each kernel launch has issued FLOPs per compute unit and compulsory HBM bytes (every
tensor read or written once; L2 reuse assumed perfect). Its roofline time is
``max(sum_u FLOPs_u / peak_u, bytes / bandwidth)``. The estimate is the larger of that,
the critical path of the busiest program when the grid cannot fill the GPU (a program
runs on one SM at 1/132 of the peaks), and a launch floor of 4 us per launch (an
assumption: eager PyTorch issues about one small kernel per 4 us). Library kernels
(cuBLAS, cuDNN, PyTorch elementwise) of the unfused sequences are assumed to reach the
roofline, which flatters them.

Peaks (H100 SXM5, dense): bf16 tensor cores 989 TFLOP/s; TF32 tensor cores 495; fp32
FMA 67 (the Triton kernels' ``input_precision="ieee"`` fp32 dots run here, not on TF32);
fp64 tensor cores 67 (assumed for fp64 ``tl.dot``, cuBLAS and cuDNN alike); fp64 FMA 34
(reductions written as elementwise products and sums); HBM3 3.35 TB/s.

Precisions: ``fp32/fp64`` is what ``px_scores`` runs (streams A and B in float32, C in
float64); ``bf16/fp32`` is the ops' cheapest path (A and B in bfloat16 on tensor cores,
C in float32 FMA). Masks are bool (1 byte); rounds after the first have one, which is
the case modelled (round 1, without a mask, turns B into a row sum in both paths).

Usage: python -m benchmarks.gpu_roofline [--json results/gpu_roofline.json]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from benchmarks.common import print_table, write_json

# ---------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Gpu:
    name: str
    peaks: dict[str, float]  # FLOP/s per compute unit
    bandwidth: float  # HBM bytes/s
    launch_seconds: float  # assumed floor per kernel launch
    sms: int


H100 = Gpu(
    name="H100 SXM5 80GB",
    peaks={"bf16_mma": 989e12, "tf32_mma": 494.5e12, "fp32_fma": 67e12, "fp64_mma": 67e12, "fp64_fma": 33.5e12},
    bandwidth=3.35e12,
    launch_seconds=4e-6,
    sms=132,
)


@dataclass(frozen=True)
class Precision:
    """Bytes and compute units of the streams. ``data``: x, u, W, a, b and the products
    of A and B; ``c``: h, c, g, g_in, C's accumulator and raw scores. ``library_conv``:
    the unit cuDNN convolutions of A and B use in the unfused sequence and the eval
    forward (``tf32_mma`` under PyTorch's default ``cudnn.allow_tf32=True``)."""

    name: str
    data_bytes: int
    data_dot: str
    data_vector: str
    c_bytes: int
    c_dot: str
    c_vector: str
    library_conv: str


FP32 = Precision("fp32/fp64", 4, "fp32_fma", "fp32_fma", 8, "fp64_mma", "fp64_fma", "fp32_fma")
BF16 = Precision("bf16/fp32", 2, "bf16_mma", "fp32_fma", 4, "fp32_fma", "fp32_fma", "bf16_mma")
# px_scores' precision with the unfused convolutions on cuDNN's default TF32.
FP32_TF32 = replace(FP32, name="fp32/fp64, cuDNN TF32", library_conv="tf32_mma")
PRECISIONS = (FP32, BF16)

MASK_BYTES = 1  # bool masks
SCORE_BYTES = 4  # the float32 scores px_scores returns


@dataclass
class Launch:
    """One kernel launch: issued FLOPs per unit, compulsory HBM bytes, ``math_flops`` (the
    multiply-adds of the products, what ``FlopCounterMode`` counts) and, when the grid
    limits the kernel, the time of its busiest program on one SM."""

    name: str
    bytes: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)
    math_flops: float = 0.0
    critical_seconds: float = 0.0
    syncs: int = 0  # host synchronizations that follow it (counted, not timed)

    def total_flops(self) -> float:
        return sum(self.flops.values())

    def roofline_seconds(self, gpu: Gpu) -> float:
        compute = sum(f / gpu.peaks[unit] for unit, f in self.flops.items())
        return max(compute, self.bytes / gpu.bandwidth)

    def seconds(self, gpu: Gpu) -> float:
        return max(self.roofline_seconds(gpu), self.critical_seconds, gpu.launch_seconds)


def by_unit(*pairs: tuple[str, float]) -> dict[str, float]:
    """FLOPs per compute unit, summing pairs that name the same unit (bf16/fp32 runs
    C's products and its elementwise work on the same fp32 FMA units)."""
    flops: dict[str, float] = {}
    for unit, value in pairs:
        flops[unit] = flops.get(unit, 0.0) + float(value)
    return flops


def tiny(name: str, syncs: int = 0) -> Launch:
    """A launch on a handful of values: it costs only its launch."""
    return Launch(name, bytes=0.0, syncs=syncs)


def per_sm_seconds(flops: dict[str, float], gpu: Gpu) -> float:
    """Time of one program's FLOPs on one SM (1/sms of each peak)."""
    return sum(f / (gpu.peaks[unit] / gpu.sms) for unit, f in flops.items())


def grid_limited(launch: Launch, programs: int, gpu: Gpu) -> Launch:
    """Marks a launch with uniform programs: fewer programs than SMs leave SMs idle."""
    if programs < gpu.sms:
        launch.critical_seconds = launch.roofline_seconds(gpu) * gpu.sms / programs
    return launch


@dataclass(frozen=True)
class Summary:
    gflop: float
    math_gflop: float
    megabytes: float
    roofline_us: float
    estimate_us: float
    launches: int
    syncs: int

    @property
    def intensity(self) -> float:
        return self.gflop * 1e3 / self.megabytes if self.megabytes else math.inf


def summarize(launches: Iterable[Launch], gpu: Gpu = H100) -> Summary:
    launches = list(launches)
    return Summary(
        gflop=sum(x.total_flops() for x in launches) / 1e9,
        math_gflop=sum(x.math_flops for x in launches) / 1e9,
        megabytes=sum(x.bytes for x in launches) / 1e6,
        roofline_us=sum(x.roofline_seconds(gpu) for x in launches) * 1e6,
        estimate_us=sum(x.seconds(gpu) for x in launches) * 1e6,
        launches=len(launches),
        syncs=sum(x.syncs for x in launches),
    )


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv2d layer group (layer, eval BatchNorm, ReLU) of a PX scoring.

    ``rows``: samples of streams A and B (conv) or their rows (linear, tokens x batch);
    ``c_rows``: stream C's, one sample. A Linear layer is a 1x1 convolution of 1x1 images.
    ``kept``: the classifier, which every stream runs with its own parameters, unfused.
    ``first``: C's input is the constant all-ones sample, so autograd computes no input
    gradient; the fused path's backward computes it anyway (fused.py makes that sample
    require grad).
    """

    name: str
    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    size: int = 1
    rows: int = 64
    c_rows: int = 1
    bias: bool = False
    norm: bool = False
    relu: bool = False
    linear: bool = False
    kept: bool = False
    first: bool = False

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def positions(self) -> int:  # output positions per sample (P)
        return self.out_size**2

    @property
    def taps(self) -> int:
        return self.kernel**2

    @property
    def depth(self) -> int:  # the GEMM reduction K = Cin * taps
        return self.cin * self.taps

    @property
    def in_elems(self) -> int:  # per row
        return self.cin * self.size**2

    @property
    def out_elems(self) -> int:
        return self.cout * self.positions

    @property
    def weights(self) -> int:
        return self.cout * self.depth

    def products(self, rows: int) -> float:
        """FLOPs of the layer's product on ``rows`` rows (2 per multiply-add)."""
        return 2.0 * rows * self.positions * self.cout * self.depth

    def describe(self) -> str:
        if self.linear:
            return f"{self.cin}->{self.cout}, N={self.rows}, R={self.c_rows}"
        return (f"{self.cin}->{self.cout} {self.kernel}x{self.kernel}/{self.stride} "
                f"@{self.size}, N={self.rows}")


# ---------------------------------------------------------------------------- fused kernels
# Formulas from the kernel headers in pxkern/kernels/triton/, checked against the code;
# where they differ the code wins (noted). Tile choices that only pad (BLOCK_K over 3
# input channels, BLOCK_R over C's rows) are counted as issued FLOPs.

# Forward configs of px_conv2d (BLOCK_M, BLOCK_N) and px_linear (BLOCK_N, BLOCK_M),
# for the busiest-program bound; the autotuner may pick any of them.
_CONV_FORWARD_TILES = ((128, 64), (64, 64), (128, 128), (64, 128), (64, 32), (32, 64), (128, 32))
_LINEAR_FORWARD_TILES = ((16, 64), (32, 64), (64, 64), (64, 128), (128, 64), (128, 128))
_CONV_MIN_BLOCK_K = 16  # the forward's smallest channel step (for Cin = 3)
_CONV_MIN_C_ROWS = 32  # its smallest position tile: C's rows are padded to it
_BACKWARD_ROWS_UNIT = 128  # px_linear backward: the largest BLOCK_M of its configs


def _linear_block_r(rows: int) -> int:
    return 1 if rows == 1 else min(max(16, 1 << (rows - 1).bit_length()), 64)


def _forward_outputs_zeroed() -> list[Launch]:
    """The two ``max|.|`` scalars the forward launchers zero before the kernel."""
    return [tiny("zero max|b|"), tiny("zero max|c|")]


def px_linear_forward(layer: Layer, p: Precision, gpu: Gpu = H100) -> list[Launch]:
    """``_px_linear_forward_kernel``: A ``x (W*M)^T``, B ``u M^T``, C ``h ((W*M)^2)^T``
    in one pass over W and M, epilogue bias/affine/gate, stores a, b, c and max|b|, max|c|."""
    n, m, k, r = layer.rows, layer.cout, layer.depth, layer.c_rows
    s, sc = p.data_bytes, p.c_bytes
    block_r = _linear_block_r(r)
    r_issued = r if r == 1 else ceil_to(r, block_r)
    c_row_tiles = cdiv(r, block_r)
    # R == 1 is a reduction on FMA units; R > 1 a tl.dot. Every C row tile squares its
    # W tile (the header says M*K squares: true for R <= BLOCK_R only).
    c_unit = p.c_vector if r == 1 else p.c_dot
    flops = by_unit(
        (p.data_dot, 4.0 * n * m * k),
        (c_unit, 2.0 * r_issued * m * k),
        (p.c_vector, c_row_tiles * m * k),
        (p.data_vector, 8.0 * n * m + 4.0 * r * m),  # epilogues
    )
    vectors = m * s * (int(layer.bias) + 2 * int(layer.norm))
    bytes_ = (2 * n * k + m * k + 2 * n * m) * s + m * k * MASK_BYTES + (r * k + r * m) * sc + vectors
    launch = Launch("px_linear forward", bytes_, flops, math_flops=layer.products(2 * n + r))
    # Programs owning C rows also run A and B on their rows: the busiest program.
    launch.critical_seconds = min(
        per_sm_seconds(by_unit((p.data_dot, 4.0 * bn * bm * k), (c_unit, 2.0 * min(r_issued, block_r) * bm * k)), gpu)
        for bn, bm in _LINEAR_FORWARD_TILES
    )
    programs = max(max(cdiv(n, bn), c_row_tiles) * cdiv(m, bm) for bn, bm in _LINEAR_FORWARD_TILES)
    if programs < gpu.sms:
        launch.critical_seconds = max(launch.critical_seconds, launch.roofline_seconds(gpu) * gpu.sms / programs)
    return _forward_outputs_zeroed() + [launch]


def px_linear_backward(layer: Layer, p: Precision, gpu: Gpu = H100) -> list[Launch]:
    """``_px_linear_backward_kernel``: ``scores = |g_pre^T h| (W*M)^2`` and partial sums
    of ``g_in = g_pre (W*M)^2`` per chunk of W's rows; then ``torch.sum`` of the partials."""
    m, k, r = layer.cout, layer.depth, layer.c_rows
    s, sc = p.data_bytes, p.c_bytes
    block_r = _linear_block_r(r)
    r_issued = r if r == 1 else ceil_to(r, block_r)
    r_tiles = cdiv(r, block_r)
    rows_per_program = _BACKWARD_ROWS_UNIT * cdiv(r, 16)
    chunks = cdiv(m, rows_per_program)
    c_unit = p.c_vector if r == 1 else p.c_dot
    flops = by_unit((c_unit, 4.0 * r_issued * m * k), (p.c_vector, (r_tiles + 2.0) * m * k))
    bytes_ = (m * k * (s + MASK_BYTES + sc) + r * (m + k) * sc + m * sc
              + (chunks * r * k * sc if chunks > 1 else r * k * sc))
    kernel = Launch("px_linear backward", bytes_, flops, math_flops=layer.products(2 * r))
    programs = max(cdiv(k, block_k) for block_k in (64, 128)) * chunks * r_tiles
    launches = [grid_limited(kernel, programs, gpu)]
    if chunks > 1:
        launches.append(Launch("sum of g_in partials", (chunks + 1) * r * k * sc,
                               {p.c_vector: float(chunks * r * k)}))
    return launches


def px_conv2d_forward(layer: Layer, p: Precision, gpu: Gpu = H100) -> list[Launch]:
    """``_forward_kernel`` of px_conv2d: implicit GEMM over (tap, Cin), A, B and, in the
    row tiles of C's R*P positions, C; epilogue bias/affine/gate; max|b|, max|c|."""
    n, r, cout = layer.rows, layer.c_rows, layer.cout
    s, sc = p.data_bytes, p.c_bytes
    positions = layer.positions
    k_issued = layer.taps * ceil_to(layer.cin, _CONV_MIN_BLOCK_K)
    c_rows_issued = ceil_to(r * positions, _CONV_MIN_C_ROWS)
    row_tiles = cdiv(max(n, r) * positions, 64)
    c_row_tiles = cdiv(r * positions, 64)
    # W*M per row tile (header: Cout*K*(1 + 2*[C]); the code multiplies once for W*M and
    # once more for C's square), and the epilogues.
    flops = by_unit(
        (p.data_dot, 4.0 * n * positions * cout * k_issued),
        (p.c_dot, 2.0 * c_rows_issued * cout * k_issued),
        (p.data_vector, row_tiles * layer.weights + 10.0 * n * positions * cout),
        (p.c_vector, c_row_tiles * layer.weights + 10.0 * r * positions * cout),
    )
    vectors = cout * s * (int(layer.bias) + 2 * int(layer.norm))
    bytes_ = ((2 * n * s + r * sc) * layer.in_elems + layer.weights * (s + MASK_BYTES)
              + (2 * n * s + r * sc) * layer.out_elems + vectors)
    launch = Launch("px_conv2d forward", bytes_, flops, math_flops=layer.products(2 * n + r))
    # Only the programs over C's positions compute C, on top of their A and B tiles:
    # in late layers they are few, and C's FMA (or fp64) rate makes them the tail.
    launch.critical_seconds = min(
        per_sm_seconds(by_unit((p.data_dot, 4.0 * bm * bn * k_issued), (p.c_dot, 2.0 * bm * bn * k_issued)), gpu)
        for bm, bn in _CONV_FORWARD_TILES
    )
    return _forward_outputs_zeroed() + [launch]


def px_conv2d_backward(layer: Layer, p: Precision, gpu: Gpu = H100) -> list[Launch]:
    """``_input_grad_kernel`` (C's cotangent through the layer, a transposed convolution
    over every input pixel and tap) and ``_score_kernel`` (the weight-gradient
    correlation per tap and ``|G| W^2 M``): two launches, W and M read by both."""
    r, cin, cout = layer.c_rows, layer.cin, layer.cout
    s, sc = p.data_bytes, p.c_bytes
    pixels = layer.size**2
    # Every tap is issued for every input pixel; at stride s only 1 in s^2 hits.
    grad_flops = by_unit((p.c_dot, 2.0 * r * pixels * cout * layer.depth),
                         (p.c_vector, cdiv(r * pixels, 16) * layer.weights + r * pixels * cout * layer.taps * cdiv(cin, 32)))
    grad_bytes = (r * layer.out_elems * sc + layer.weights * (s + MASK_BYTES) + r * layer.in_elems * sc + cout * sc)
    grad = Launch("px_conv2d input grad", grad_bytes, grad_flops, math_flops=layer.products(r))
    grad = grid_limited(grad, cdiv(r * pixels, 16) * cdiv(cin, 32), gpu)
    # The score's dot pads Cin to its BLOCK_N (at least 32) and positions to BLOCK_K.
    score_flops = by_unit(
        (p.c_dot, 2.0 * ceil_to(r * layer.positions, 32) * ceil_to(cout, 16) * ceil_to(cin, 32) * layer.taps),
        (p.c_vector, 4.0 * layer.weights),
    )
    score_bytes = (r * layer.out_elems * sc + r * layer.in_elems * sc
                   + layer.weights * (s + MASK_BYTES + sc) + cout * sc)
    score = Launch("px_conv2d score", score_bytes, score_flops, math_flops=layer.products(r))
    score = grid_limited(score, cdiv(cout, 16) * cdiv(cin, 32) * layer.taps, gpu)
    return [grad, score]


def fused_forward(layer: Layer, p: Precision) -> list[Launch]:
    return px_linear_forward(layer, p) if layer.linear else px_conv2d_forward(layer, p)


def fused_backward(layer: Layer, p: Precision) -> list[Launch]:
    return px_linear_backward(layer, p) if layer.linear else px_conv2d_backward(layer, p)


# ---------------------------------------------------------------------------- unfused


def _product_unit(layer: Layer, p: Precision) -> str:
    return p.data_dot if layer.linear else p.library_conv


def unfused_forward(layer: Layer, p: Precision) -> list[Launch]:
    """What the stream path (pxkern.px.streams) runs for the layer group, kernel by
    kernel: the weight copies it substitutes, then per stream the product, the magnitude
    pass of the exponent rule (scaled.py measures after every weighted op), BatchNorm,
    and A's ReLU and sign gate / B's gate multiply."""
    s, sc = p.data_bytes, p.c_bytes
    n, r, w = layer.rows, layer.c_rows, layer.weights
    y_ab, y_c = n * layer.out_elems, r * layer.out_elems
    bias = layer.cout * int(layer.bias)
    unit = _product_unit(layer, p)

    def product(stream: str, rows: int, size: int, dot: str) -> Launch:
        return Launch(f"{stream} {'linear' if layer.linear else 'conv'}",
                      (rows * layer.in_elems + w + rows * layer.out_elems + bias) * size,
                      {dot: layer.products(rows)}, math_flops=layer.products(rows))

    launches = [
        Launch("mask to data dtype (B's weight)", w * (MASK_BYTES + s)),
        Launch("W*M", 3 * w * s, {p.data_vector: float(w)}),
        Launch("W*M to C's dtype", w * (s + sc)),
        Launch("(W*M)^2 in place", 2 * w * sc, {p.c_vector: float(w)}),
    ]
    for stream, rows, elems, size, dot in (("A", n, y_ab, s, unit), ("B", n, y_ab, s, unit),
                                           ("C", r, y_c, sc, p.c_dot)):
        launches.append(product(stream, rows, size, dot))
        launches.append(Launch(f"{stream} magnitude (aminmax)", elems * size))
        if layer.norm:
            launches.append(Launch(f"{stream} BatchNorm", 2 * elems * size, {p.data_vector: 2.0 * elems}))
        if layer.relu and stream == "A":
            launches.append(Launch("A ReLU", 2 * elems * size))
            launches.append(Launch("A gate = sign", 2 * elems * size))
        if layer.relu and stream == "B":
            launches.append(Launch("B gate multiply", 3 * elems * size, {p.data_vector: float(elems)}))
    return launches


def unfused_backward(layer: Layer, p: Precision) -> list[Launch]:
    """Autograd through stream C (BatchNorm backward, the product's input and weight
    gradients) and the score ``|G| * W^2 * M`` as separate passes, in C's dtype."""
    s, sc = p.data_bytes, p.c_bytes
    r, w = layer.c_rows, layer.weights
    x_c, y_c = r * layer.in_elems, r * layer.out_elems
    launches = []
    if layer.norm:
        launches.append(Launch("BatchNorm backward", 2 * y_c * sc, {p.c_vector: float(y_c)}))
    if not layer.first:
        launches.append(Launch("grad input", (y_c + w + x_c) * sc, {p.c_dot: layer.products(r)},
                               math_flops=layer.products(r)))
    launches += [
        Launch("grad weight", (y_c + x_c + w) * sc, {p.c_dot: layer.products(r)}, math_flops=layer.products(r)),
        # G.abs() * W * W * M, one eager op each.
        Launch("|G|", 2 * w * sc, {p.c_vector: float(w)}),
        Launch("* W", w * (2 * sc + s), {p.c_vector: float(w)}),
        Launch("* W", w * (2 * sc + s), {p.c_vector: float(w)}),
        Launch("* mask", w * (MASK_BYTES + 2 * sc), {p.c_vector: float(w)}),
    ]
    return launches


def eval_forward_layer(layer: Layer, p: Precision) -> list[Launch]:
    """The layer group in one eager eval forward: the product, BatchNorm, ReLU in place."""
    s, n = p.data_bytes, layer.rows
    y = n * layer.out_elems
    launches = [Launch("product", (n * layer.in_elems + layer.weights + y + layer.cout * int(layer.bias)) * s,
                       {_product_unit(layer, p): layer.products(n)}, math_flops=layer.products(n))]
    if layer.norm:
        launches.append(Launch("BatchNorm", 2 * y * s))
    if layer.relu:
        launches.append(Launch("ReLU", 2 * y * s))
    return launches


# ---------------------------------------------------------------------------- glue


def fused_glue(layer: Layer) -> list[Launch]:
    """What pxkern.px.fused does per layer group around the op calls: fold the eval
    BatchNorm (6 small ops), read max|b| and max|c| on the host (2 syncs), and in the
    backward form the cotangent scale (1 or 2 small ops)."""
    launches = [tiny("BatchNorm fold") for _ in range(6 if layer.norm else 0)]
    launches.append(tiny("read max|b|, max|c|", syncs=2))
    launches += [tiny("kernel scale") for _ in range(2 if layer.norm else 1)]
    return launches


def fused_backward_glue(layer: Layer, p: Precision) -> list[Launch]:
    """``grad.contiguous()`` in the backward: a channels-last cotangent is copied to NCHW."""
    if layer.linear:
        return []
    return [Launch("cotangent contiguous()", 2 * layer.c_rows * layer.out_elems * p.c_bytes)]


def stream_glue(layer: Layer) -> list[Launch]:
    """What the stream path adds per layer group: the magnitude rule's small ops after
    each product (|peak|, isfinite, ==0, frexp: 5 ops, 3 host syncs), BatchNorm's
    rescaled constants (2 ops) and the rescaled bias, per stream."""
    launches = []
    for _ in range(3):
        launches += [tiny("exponent of peak", syncs=3 if i == 0 else 0) for i in range(5)]
        launches += [tiny("BatchNorm constants") for _ in range(2 if layer.norm else 0)]
        launches += [tiny("scaled bias") for _ in range(int(layer.bias))]
    return launches


def score_finish(layer: Layer, p: Precision) -> list[Launch]:
    """Shared by both paths per weight: the scores' largest exponent and the float32 cast."""
    w = layer.weights
    return [Launch("scores aminmax", w * p.c_bytes, syncs=1), Launch("scores to float32", w * (p.c_bytes + SCORE_BYTES))]


# ---------------------------------------------------------------------------- between layers


@dataclass(frozen=True)
class Between:
    """An op between layer groups, sizes per sample: ``add`` (residual), ``relu`` (after
    the add), ``maxpool``/``avgpool``, ``square`` (B's input ``x*x``)."""

    kind: str
    in_elems: int
    out_elems: int
    rows: int = 64


def between_launches(op: Between, path: str, p: Precision) -> list[Launch]:
    """Launches of ``op`` on ``path`` ("fused", "stream" or "eval"), streams A and B on
    the batch, C on one sample (forward, and its backward under autograd)."""
    s, sc, n = p.data_bytes, p.c_bytes, op.rows
    e, e_c = n * op.in_elems, op.in_elems
    if op.kind == "square":
        return [] if path == "eval" else [Launch("x*x", 2 * e * s), tiny("C's ones")]
    if op.kind == "add":
        if path == "eval":
            return [Launch("add", 3 * e * s)]
        # fused._aligned_sum multiplies both operands by their alignment factor; the
        # stream path's rule multiplies only the one whose exponent differs.
        aligned = 2 if path == "fused" else 1
        forward = [Launch("A add", 3 * e * s)]
        for size, elems, stream in ((s, e, "B"), (sc, e_c, "C")):
            forward += [Launch(f"{stream} align", 2 * elems * size) for _ in range(aligned)]
            forward.append(Launch(f"{stream} add", 3 * elems * size))
        backward = [Launch("C align backward", 2 * e_c * sc) for _ in range(aligned)]
        return forward + backward
    if op.kind == "relu":
        if path == "eval":
            return [Launch("ReLU", 2 * e * s)]
        if path == "fused":
            return [Launch("A gate a>0", e * (s + 1)), Launch("A ReLU", 2 * e * s), Launch("B * gate", e * (2 * s + 1))]
        return [Launch("A ReLU", 2 * e * s), Launch("A sign", 2 * e * s), Launch("B * gate", 3 * e * s)]
    if op.kind in ("maxpool", "avgpool"):
        out, out_c = n * op.out_elems, op.out_elems
        streams = [("A", e, out, s)] + ([] if path == "eval" else [("B", e, out, s), ("C", e_c, out_c, sc)])
        launches = [Launch(f"{name} {op.kind}", (i + o) * size) for name, i, o, size in streams]
        if path != "eval":
            indices = 8 * out_c if op.kind == "maxpool" else 0
            launches.append(Launch(f"C {op.kind} backward", (out_c + e_c) * sc + indices))
        return launches
    raise ValueError(f"unknown op between layers: {op.kind!r}")


# ---------------------------------------------------------------------------- models


def resnet50(batch: int = 64) -> list[Layer | Between]:
    """torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224 px, in forward order."""
    items: list[Layer | Between] = [Between("square", 3 * 224 * 224, 3 * 224 * 224, batch)]
    items.append(Layer("conv1", 3, 64, 7, 2, 3, 224, batch, norm=True, relu=True, first=True))
    items.append(Between("maxpool", 64 * 112 * 112, 64 * 56 * 56, batch))
    cin, size = 64, 56
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for index in range(blocks):
            stride = 2 if index == 0 and stage > 1 else 1
            prefix = f"layer{stage}.{index}"
            out = width * 4
            items.append(Layer(f"{prefix}.conv1", cin, width, 1, 1, 0, size, batch, norm=True, relu=True))
            items.append(Layer(f"{prefix}.conv2", width, width, 3, stride, 1, size, batch, norm=True, relu=True))
            size_out = size // stride
            items.append(Layer(f"{prefix}.conv3", width, out, 1, 1, 0, size_out, batch, norm=True))
            if index == 0:
                items.append(Layer(f"{prefix}.downsample", cin, out, 1, stride, 0, size, batch, norm=True))
            items.append(Between("add", out * size_out**2, out * size_out**2, batch))
            items.append(Between("relu", out * size_out**2, out * size_out**2, batch))
            cin, size = out, size_out
    items.append(Between("avgpool", 2048 * 49, 2048, batch))
    items.append(Layer("fc", 2048, 1000, rows=batch, bias=True, linear=True, kept=True))
    return items


VIT_TOKENS = 197


def vit_b16(batch: int = 64) -> list[Layer | Between]:
    """The prunable layers of ViT-B/16 at 224 px: patch embedding, 12 blocks of qkv,
    proj, fc1, fc2 (on 197 tokens per sample), the head on the class token. fc1's GELU
    is taken as a ReLU (PX defines ReLU only); attention and LayerNorm are left out."""
    tokens = batch * VIT_TOKENS
    items: list[Layer | Between] = [
        Layer("patch_embed", 3, 768, 16, 16, 0, 224, batch, bias=True, first=True),
    ]
    for block in range(12):
        for name, cin, cout, relu in (("qkv", 768, 2304, False), ("proj", 768, 768, False),
                                      ("fc1", 768, 3072, True), ("fc2", 3072, 768, False)):
            items.append(Layer(f"blocks.{block}.{name}", cin, cout, rows=tokens, c_rows=VIT_TOKENS,
                               bias=True, relu=relu, linear=True))
    items.append(Layer("head", 768, 1000, rows=batch, bias=True, linear=True, kept=True))
    return items


SCORING_PARTS = ("forward", "backward", "between", "glue")  # layer groups, ops between them, glue


def scoring_parts(items: list[Layer | Between], p: Precision, path: str) -> dict[str, list[Launch]]:
    """Every launch of one PX scoring (A and B on the batch, C on one sample, C's
    backward with the scores) on ``path`` "fused" or "stream", by part: the layer groups'
    kernels (kept layers run unfused on both paths), the ops between them, and the small
    ops and score finishing around the layers."""
    parts: dict[str, list[Launch]] = {part: [] for part in SCORING_PARTS}
    for item in items:
        if isinstance(item, Between):
            parts["between"] += between_launches(item, path, p)
            continue
        parts["glue"] += score_finish(item, p)
        if path == "fused" and not item.kept:
            parts["forward"] += fused_forward(item, p)
            parts["backward"] += fused_backward_glue(item, p) + fused_backward(item, p)
            parts["glue"] += fused_glue(item)
        else:
            parts["forward"] += unfused_forward(item, p)
            parts["backward"] += unfused_backward(item, p)
            parts["glue"] += stream_glue(item)
    return parts


def scoring(items: list[Layer | Between], p: Precision, path: str) -> list[Launch]:
    return [launch for part in scoring_parts(items, p, path).values() for launch in part]


def eval_forward(items: list[Layer | Between], p: Precision) -> list[Launch]:
    launches = []
    for item in items:
        launches += between_launches(item, "eval", p) if isinstance(item, Between) else eval_forward_layer(item, p)
    return launches


def layer_named(items: list[Layer | Between], name: str) -> Layer:
    return next(item for item in items if isinstance(item, Layer) and item.name == name)


# ---------------------------------------------------------------------------- BSR


@dataclass(frozen=True)
class BsrShape:
    """``W [M, K]`` block-sparse times ``rows`` dense rows (bsr_linear's ``x [rows, K]``;
    bsr_dense_mm's X has ``rows`` columns: the same counts). ``c_rows``: stream C's rows."""

    name: str
    m: int
    k: int
    rows: int
    c_rows: int


def bsr_shapes(batch: int = 64) -> list[BsrShape]:
    tokens = batch * VIT_TOKENS
    return [
        BsrShape("vit.qkv", 2304, 768, tokens, VIT_TOKENS),
        BsrShape("vit.proj", 768, 768, tokens, VIT_TOKENS),
        BsrShape("vit.fc1", 3072, 768, tokens, VIT_TOKENS),
        BsrShape("vit.fc2", 768, 3072, tokens, VIT_TOKENS),
        # ResNet-50 convolutions as GEMMs: W [Cout, Cin*kh*kw], X = im2col of the input
        # (not counted: the BSR ops take X as given).
        BsrShape("r50.layer3.3x3", 256, 2304, batch * 196, 196),
        BsrShape("r50.layer4.1x1", 2048, 512, batch * 49, 49),
        BsrShape("r50.layer4.3x3", 512, 4608, batch * 49, 49),
    ]


def _stored_blocks(shape: BsrShape, density: float, block: int) -> int:
    return max(1, round(density * (shape.m // block) * (shape.k // block)))


def bsr_mm(shape: BsrShape, rows: int, density: float, block: int, size: int, dot: str, vector: str,
           square: bool, gpu: Gpu = H100) -> list[Launch]:
    """``_bsr_mm_kernel`` (bsr_dense_mm / bsr_linear): ``d*M*K*rows`` multiply-adds,
    the stored blocks, X, Y and int32 metadata read or written once."""
    nnz = _stored_blocks(shape, density, block)
    stored = nnz * block * block
    # Squaring: once per loaded weight, and every column tile reloads it.
    flops = by_unit((dot, 2.0 * stored * ceil_to(rows, 16)), (vector, stored * cdiv(rows, 64) if square else 0))
    bytes_ = (stored + shape.k * rows + shape.m * rows) * size + 4 * (shape.m // block + 1 + nnz)
    launch = Launch("bsr_mm", bytes_, flops, math_flops=2.0 * stored * rows)
    return [grid_limited(launch, cdiv(rows, 16) * (shape.m // 16), gpu)]


def dense_mm(shape: BsrShape, rows: int, size: int, dot: str, square: bool) -> list[Launch]:
    """cuBLAS on the dense weight (zeros included); squaring materializes W∘W first."""
    launches = [Launch("W*W", 2 * shape.m * shape.k * size)] if square else []
    flops = 2.0 * shape.m * shape.k * rows
    return launches + [Launch("dense mm", (shape.m * shape.k + (shape.k + shape.m) * rows) * size, {dot: flops},
                              math_flops=flops)]


def torch_bsr_mm(shape: BsrShape, rows: int, density: float, block: int, size: int, dot: str,
                 square: bool) -> list[Launch]:
    """torch.sparse BSR times dense: the same products and values; int64 metadata; the
    squared weight is a new values tensor."""
    nnz = _stored_blocks(shape, density, block)
    stored = nnz * block * block
    launches = [Launch("values^2", 2 * stored * size)] if square else []
    bytes_ = (stored + (shape.k + shape.m) * rows) * size + 8 * (shape.m // block + 1 + nnz)
    flops = 2.0 * stored * rows
    return launches + [Launch("torch.sparse mm", bytes_, {dot: flops}, math_flops=flops)]


def bsr_px_scores(shape: BsrShape, density: float, block: int, size: int, dot: str, vector: str,
                  gpu: Gpu = H100) -> list[Launch]:
    """``_bsr_px_scores_kernel``: ``|grad_out^T inputs| * W^2`` at the stored blocks,
    after the launcher's block-row index (arange, diff, repeat_interleave)."""
    nnz = _stored_blocks(shape, density, block)
    stored = nnz * block * block
    r = shape.c_rows
    out_size = max(size, SCORE_BYTES)
    flops = by_unit((dot, 2.0 * ceil_to(r, 16) * stored), (vector, 3.0 * stored))
    bytes_ = stored * (size + out_size) + r * (shape.m + shape.k) * size + 8 * nnz
    kernel = Launch("bsr_px_scores", bytes_, flops, math_flops=2.0 * r * stored)
    index = [tiny("arange"), tiny("diff"), Launch("repeat_interleave", 8 * nnz)]
    return index + [grid_limited(kernel, nnz * (block // 32) ** 2, gpu)]


def dense_px_scores(shape: BsrShape, density: float, block: int, size: int, dot: str, vector: str) -> list[Launch]:
    """The same with dense ops: ``G = g^T h`` over the whole weight, gathered at the
    stored blocks, then |.|, the squares and the product as separate passes."""
    stored = _stored_blocks(shape, density, block) * block * block
    r, mk = shape.c_rows, shape.m * shape.k
    out_size = max(size, SCORE_BYTES)
    flops = 2.0 * r * mk
    return [
        Launch("G = g^T h", r * (shape.m + shape.k) * size + mk * out_size, {dot: flops}, math_flops=flops),
        Launch("gather stored blocks", 2 * stored * out_size),
        Launch("|G|", 2 * stored * out_size, {vector: float(stored)}),
        Launch("values^2", stored * (size + out_size), {vector: float(stored)}),
        Launch("|G| * W^2", 3 * stored * out_size, {vector: float(stored)}),
    ]


# ---------------------------------------------------------------------------- tables

RESNET_TABLE_LAYERS = (
    "conv1", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv2", "layer3.1.conv2",
    "layer4.0.downsample", "layer4.1.conv1", "layer4.1.conv2", "layer4.1.conv3",
)
BSR_DENSITIES = (0.1, 0.05)
BSR_BLOCKS = (32, 64)


def table_layers() -> tuple[list[Layer], list[Layer]]:
    """(ResNet-50 convolutions, Linear layers) of the per-kernel tables."""
    resnet, vit = resnet50(), vit_b16()
    convs = [layer_named(resnet, name) for name in RESNET_TABLE_LAYERS]
    linears = [layer_named(vit, f"blocks.0.{name}") for name in ("qkv", "proj", "fc1", "fc2")]
    linears += [replace(layer_named(vit, "head"), kept=False), replace(layer_named(resnet, "fc"), kept=False)]
    return convs, linears


def comparison_rows(kernel: str, layers: list[Layer], fused: Callable, unfused: Callable) -> list[dict]:
    """One row per layer and precision: fused op vs unfused sequence."""
    rows = []
    for layer in layers:
        for p in PRECISIONS:
            f, u = summarize(fused(layer, p)), summarize(unfused(layer, p))
            rows.append({
                "kernel": kernel, "layer": layer.name, "shape": layer.describe(), "precision": p.name,
                "fused_gflop": f.gflop, "fused_mb": f.megabytes, "intensity": f.intensity,
                "fused_roofline_us": f.roofline_us, "fused_us": f.estimate_us, "fused_launches": f.launches,
                "unfused_gflop": u.gflop, "unfused_mb": u.megabytes, "unfused_intensity": u.intensity,
                "unfused_roofline_us": u.roofline_us, "unfused_us": u.estimate_us,
                "unfused_launches": u.launches, "speedup": u.estimate_us / f.estimate_us,
            })
    return rows


def bsr_rows() -> list[dict]:
    rows = []
    for shape in bsr_shapes():
        for block in BSR_BLOCKS:
            for density in BSR_DENSITIES:
                for p in PRECISIONS:
                    data = (p.data_bytes, p.data_dot)
                    c = (p.c_bytes, p.c_dot)
                    ab = summarize(bsr_mm(shape, shape.rows, density, block, *data, p.data_vector, False))
                    ab_dense = summarize(dense_mm(shape, shape.rows, *data, False))
                    ab_torch = summarize(torch_bsr_mm(shape, shape.rows, density, block, *data, False))
                    sq = summarize(bsr_mm(shape, shape.c_rows, density, block, *c, p.c_vector, True))
                    sq_dense = summarize(dense_mm(shape, shape.c_rows, *c, True))
                    sq_torch = summarize(torch_bsr_mm(shape, shape.c_rows, density, block, *c, True))
                    sc = summarize(bsr_px_scores(shape, density, block, *c, p.c_vector))
                    sc_dense = summarize(dense_px_scores(shape, density, block, *c, p.c_vector))
                    rows.append({
                        "kernel": "bsr", "case": f"{shape.name} {block}x{block} d={density}",
                        "shape": shape.name, "m": shape.m, "k": shape.k, "rows": shape.rows,
                        "c_rows": shape.c_rows, "block": block, "density": density, "precision": p.name,
                        "mm_gflop": ab.gflop, "mm_mb": ab.megabytes, "mm_intensity": ab.intensity,
                        "mm_us": ab.estimate_us, "dense_us": ab_dense.estimate_us,
                        "torch_bsr_us": ab_torch.estimate_us,
                        "squared_us": sq.estimate_us, "squared_dense_us": sq_dense.estimate_us,
                        "squared_torch_bsr_us": sq_torch.estimate_us,
                        "scores_us": sc.estimate_us, "scores_dense_us": sc_dense.estimate_us,
                    })
    return rows


MODELS = (("ResNet-50, B=64", resnet50), ("ViT-B/16 linear layers, B=64", vit_b16))


def model_rows() -> list[dict]:
    rows = []
    for model, build in MODELS:
        items = build()
        for p in (FP32, FP32_TF32, BF16):
            fused, stream, forward = (summarize(scoring(items, p, "fused")),
                                      summarize(scoring(items, p, "stream")), summarize(eval_forward(items, p)))
            rows.append({
                "model": model, "precision": p.name,
                "eval_forward_ms": forward.estimate_us / 1e3, "eval_forward_roofline_ms": forward.roofline_us / 1e3,
                "unfused_ms": stream.estimate_us / 1e3, "unfused_roofline_ms": stream.roofline_us / 1e3,
                "fused_ms": fused.estimate_us / 1e3, "fused_roofline_ms": fused.roofline_us / 1e3,
                "unfused_per_forward": stream.estimate_us / forward.estimate_us,
                "fused_per_forward": fused.estimate_us / forward.estimate_us,
                "speedup": stream.estimate_us / fused.estimate_us,
                "fused_gb": fused.megabytes / 1e3, "unfused_gb": stream.megabytes / 1e3,
                "fused_tflop": fused.gflop / 1e3, "unfused_tflop": stream.gflop / 1e3,
                "fused_launches": fused.launches, "unfused_launches": stream.launches,
                "fused_syncs": fused.syncs, "unfused_syncs": stream.syncs,
            })
    return rows


def breakdown_rows() -> list[dict]:
    """Where each path's scoring time goes, per model and precision (ms)."""
    rows = []
    for model, build in MODELS:
        items = build()
        for p in PRECISIONS:
            row = {"breakdown": model, "precision": p.name}
            for path in ("stream", "fused"):
                for part, launches in scoring_parts(items, p, path).items():
                    row[f"{path} {part}"] = summarize(launches).estimate_us / 1e3
            rows.append(row)
    return rows


def _merged(rows: list[dict], key: str, per_precision: tuple[str, ...]) -> list[dict]:
    """One printed row per ``key`` value, with ``per_precision`` columns suffixed by
    precision (``fp32``, ``bf16``)."""
    merged: dict[str, dict] = {}
    for row in rows:
        out = merged.setdefault(row[key], dict(row))
        tag = row["precision"].split("/")[0]
        for column in per_precision:
            out[f"{column}_{tag}"] = row[column]
    return list(merged.values())


def _kernel_columns() -> list[tuple[str, str, str]]:
    return [
        ("layer", "layer", ""), ("shape", "shape", ""),
        ("fused_gflop", "GFLOP", ".2f"), ("fused_mb_fp32", "MB", ".1f"), ("intensity_fp32", "FLOP/B", ".0f"),
        ("unfused_mb_fp32", "MB unf.", ".1f"),
        ("fused_us_fp32", "fused us", ".1f"), ("unfused_us_fp32", "unf. us", ".1f"), ("speedup_fp32", "x", ".2f"),
        ("fused_mb_bf16", "MB bf16", ".1f"), ("fused_us_bf16", "fused us", ".1f"),
        ("unfused_us_bf16", "unf. us", ".1f"), ("speedup_bf16", "x", ".2f"),
        ("fused_launches", "launch", "d"), ("unfused_launches", "unf.", "d"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    args = parser.parse_args()

    print(f"ESTIMATES from a roofline model of an {H100.name} (no GPU measured anything): "
          f"{H100.bandwidth / 1e12:.2f} TB/s, peaks {', '.join(f'{u} {v / 1e12:g}' for u, v in H100.peaks.items())} "
          f"TFLOP/s, {H100.launch_seconds * 1e6:g} us per launch. Columns: fp32 = A/B fp32, C fp64; "
          f"bf16 = A/B bf16, C fp32; 'unf.' = the unfused PyTorch sequence.")
    convs, linears = table_layers()
    per_precision = ("fused_mb", "intensity", "unfused_mb", "fused_us", "unfused_us", "speedup")
    all_rows = []
    for title, kernel, layers, fused, unfused in (
        ("px_conv2d forward (streams A+B on 64 images, C on 1) vs the stream path's sequence",
         "px_conv2d forward", convs, fused_forward, unfused_forward),
        ("px_conv2d backward (input grad + score kernels, C on 1 image) vs autograd + score passes",
         "px_conv2d backward", convs, fused_backward, unfused_backward),
        ("px_linear forward vs the stream path's sequence", "px_linear forward", linears, fused_forward,
         unfused_forward),
        ("px_linear backward vs autograd + score passes", "px_linear backward", linears, fused_backward,
         unfused_backward),
    ):
        rows = comparison_rows(kernel, layers, fused, unfused)
        all_rows += rows
        print(f"\n{title}")
        print_table(_merged(rows, "layer", per_precision), _kernel_columns())

    rows = bsr_rows()
    all_rows += rows
    print("\nBSR (block-sparse W [M, K]), us: bsr_mm on the batch's rows (A/B) vs dense cuBLAS and "
          "torch.sparse BSR; on one sample's rows (C): the squared-weight product and bsr_px_scores vs "
          "dense ops. fp32 = A/B fp32, C fp64; bf16 = A/B bf16, C fp32")
    columns = [("shape", "shape", ""), ("block", "block", "d"), ("density", "dens.", ".2f"),
               ("mm_gflop", "GFLOP", ".2f"), ("mm_mb_fp32", "MB", ".1f"), ("mm_intensity_fp32", "FLOP/B", ".0f")]
    for tag in ("fp32", "bf16"):
        columns += [(f"mm_us_{tag}", f"bsr {tag}", ".1f"), (f"dense_us_{tag}", "dense", ".1f"),
                    (f"torch_bsr_us_{tag}", "torch", ".1f")]
    for tag in ("fp32", "bf16"):
        columns += [(f"squared_us_{tag}", f"C: W^2 {tag}", ".1f"), (f"squared_dense_us_{tag}", "dense", ".1f"),
                    (f"scores_us_{tag}", "scores", ".1f"), (f"scores_dense_us_{tag}", "dense", ".1f")]
    print_table(_merged(rows, "case", ("mm_mb", "mm_intensity", "mm_us", "dense_us", "torch_bsr_us", "squared_us",
                                       "squared_dense_us", "scores_us", "scores_dense_us")), columns)

    rows = model_rows()
    all_rows += rows
    print("\nWhole model, one PX scoring (A+B on the batch, C on one sample, C's backward with the scores); ms")
    print_table(rows, [
        ("model", "model", ""), ("precision", "precision", ""),
        ("eval_forward_ms", "eval fwd", ".2f"), ("unfused_ms", "unfused", ".2f"), ("fused_ms", "fused", ".2f"),
        ("unfused_roofline_ms", "unf. roofline", ".2f"), ("fused_roofline_ms", "fused roofline", ".2f"),
        ("unfused_per_forward", "unf./fwd", ".2f"), ("fused_per_forward", "fused/fwd", ".2f"),
        ("speedup", "unf./fused", ".2f"), ("unfused_gb", "GB unf.", ".1f"), ("fused_gb", "GB fused", ".1f"),
        ("unfused_launches", "launch unf.", "d"), ("fused_launches", "launch fused", "d"),
        ("unfused_syncs", "syncs unf.", "d"), ("fused_syncs", "syncs fused", "d"),
    ])
    rows = breakdown_rows()
    all_rows += rows
    print("\nWhere the scoring time goes, ms: layer groups forward and backward, ops between layers, glue")
    print_table(rows, [("breakdown", "model", ""), ("precision", "precision", "")]
                + [(f"{path} {part}", f"{label} {part}", ".2f")
                   for path, label in (("stream", "unf."), ("fused", "fused")) for part in SCORING_PARTS])
    write_json(args.json, "gpu_roofline", {
        "gpu": H100.name, "peaks_flops": H100.peaks, "bandwidth_bytes_per_s": H100.bandwidth,
        "launch_seconds": H100.launch_seconds, "sms": H100.sms, "estimates_not_measurements": True,
        "precisions": [vars(p) for p in (FP32, FP32_TF32, BF16)],
    }, all_rows)


if __name__ == "__main__":
    main()
