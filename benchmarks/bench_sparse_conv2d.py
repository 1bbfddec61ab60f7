"""Benchmark pxkern sparse_conv2d against F.conv2d (oneDNN) on the masked dense weight.

Shapes are CIFAR ResNet-20 3x3 layers (N=128) and a VGG-16 layer (N=64); masks are random
at each density. Dense F.conv2d on channels-first and channels-last input and the sparse
kernel run in turn within each of --repeats repeats (after --warmup), medians reported.

FLOP model (useful work): 2 * nnz(weight) * N * H_out * W_out, one multiply-add per
nonzero weight per output pixel. The dense baseline is given the same FLOP count, so its
GFLOP/s column is what the pruned layer effectively achieves with a dense kernel.

Usage: python -m benchmarks.bench_sparse_conv2d [--json results/sparse_conv2d.json]
"""

import argparse
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, prepare_kernel_benchmark, write_json
from pxkern.ops.sparse_conv2d import MAX_SPARSE_DENSITY, sparse_conv2d

DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)


@dataclass(frozen=True)
class ConvShape:
    name: str
    n: int
    c_in: int
    c_out: int
    hw: int
    kernel: int
    stride: int
    padding: int


SHAPES = (
    ConvShape("resnet20.stage1 16@32x32", 128, 16, 16, 32, 3, 1, 1),
    ConvShape("resnet20.stage2 32@16x16", 128, 32, 32, 16, 3, 1, 1),
    ConvShape("resnet20.stage3 64@8x8", 128, 64, 64, 8, 3, 1, 1),
    ConvShape("resnet20.down 16->32 s2", 128, 16, 32, 32, 3, 2, 1),
    ConvShape("vgg16 128@16x16", 64, 128, 128, 16, 3, 1, 1),
)


def run(shape: ConvShape, density: float, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.n, shape.c_in, shape.hw, shape.hw, generator=gen, dtype=dtype)
    w_shape = (shape.c_out, shape.c_in, shape.kernel, shape.kernel)
    mask = torch.rand(w_shape, generator=gen) < density
    weight = torch.randn(w_shape, generator=gen, dtype=dtype) * mask
    bias = torch.randn(shape.c_out, generator=gen, dtype=dtype)
    conv_args = (bias, shape.stride, shape.padding)

    expected = F.conv2d(x, weight, *conv_args)
    # Guards against timing a wrong kernel; float32 sums of up to 1152 products differ from
    # oneDNN's summation order by ~1e-5.
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(sparse_conv2d(x, weight, *conv_args), expected, atol=tol, rtol=tol)
    # oneDNN is much faster on channels-last input for few channels (the layout the PX
    # streams use), so it is the baseline that decides; channels-first is reported too.
    x_last = x.contiguous(memory_format=torch.channels_last)
    times = interleaved_medians(
        {"dense": lambda: F.conv2d(x, weight, *conv_args),
         "dense_cl": lambda: F.conv2d(x_last, weight, *conv_args),
         "sparse": lambda: sparse_conv2d(x, weight, *conv_args)},
        warmup, repeats,
    )
    dense_s, dense_cl_s, sparse_s = times["dense"], times["dense_cl"], times["sparse"]

    nnz = int(torch.count_nonzero(weight))
    flop = 2 * nnz * shape.n * expected.shape[2] * expected.shape[3]
    return {
        **asdict(shape),
        "density": density,
        "nnz": nnz,
        "useful_flop": flop,
        "dense_ms": dense_s * 1e3,
        "dense_channels_last_ms": dense_cl_s * 1e3,
        "sparse_ms": sparse_s * 1e3,
        "speedup_vs_dense": dense_s / sparse_s,
        "speedup_vs_dense_channels_last": dense_cl_s / sparse_s,
        "dense_useful_gflops": flop / dense_s / 1e9,
        "sparse_useful_gflops": flop / sparse_s / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write result rows as JSON")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    prepare_kernel_benchmark(args.threads)
    dtype = getattr(torch, args.dtype)

    rows = []
    header = (
        f"{'layer':<26} {'density':>7} {'dense ms':>9} {'dense CL':>9} {'sparse ms':>9} {'vs dense':>8} {'vs CL':>6} "
        f"{'dense GF/s':>10} {'sparse GF/s':>11}"
    )
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for shape in SHAPES:
            for density in DENSITIES:
                row = run(shape, density, dtype, args.warmup, args.repeats)
                rows.append(row)
                print(
                    f"{shape.name:<26} {density:>7.2f} {row['dense_ms']:>9.3f} "
                    f"{row['dense_channels_last_ms']:>9.3f} {row['sparse_ms']:>9.3f} "
                    f"{row['speedup_vs_dense']:>7.2f}x {row['speedup_vs_dense_channels_last']:>5.2f}x "
                    f"{row['dense_useful_gflops']:>10.1f} {row['sparse_useful_gflops']:>11.1f}",
                    flush=True,
                )

    print("\nlargest measured density where sparse_conv2d beats F.conv2d in both layouts:")
    for shape in SHAPES:
        winning = [r["density"] for r in rows if r["name"] == shape.name
                   and min(r["speedup_vs_dense"], r["speedup_vs_dense_channels_last"]) > 1]
        print(f"  {shape.name:<26} {max(winning) if winning else 'none'}")
    print(f"(densities above MAX_SPARSE_DENSITY = {MAX_SPARSE_DENSITY} always run dense)")

    config = {
        "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
        "pxkern_cpu_isa": os.environ.get("PXKERN_CPU_ISA", "auto"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "flop_model": "2 * nnz(weight) * N * H_out * W_out",
    }
    write_json(args.json, "sparse_conv2d", config, rows)

if __name__ == "__main__":
    main()
