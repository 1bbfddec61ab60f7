"""Benchmark pxkern bsr_dense_mm / bsr_linear against dense torch.mm and torch.sparse BSR/CSR.

W is 2048 x 2048 with 32 x 32 blocks kept at random at each block density, X is
2048 x 256 (a ViT-B-sized linear layer applied to 256 tokens). All kernels run in turn
within each of --repeats repeats (after --warmup); medians reported:

  dense      torch.mm(W, X) on the dense W (MKL), the time a dense kernel spends on W
  ideal      density * dense: what skipping the zero blocks would save at dense speed
  torch_bsr  W.to_sparse_bsr((32, 32)) @ X
  torch_csr  W.to_sparse_csr() @ X
  pxkern     bsr_dense_mm(W's BSR fields, X)
  linear     bsr_linear(W's BSR fields, X^T), the same product in the nn.Linear layout

FLOP model (useful work): 2 * nnz_blocks * bm * bn * N, one multiply-add per stored
weight per column of X; every GFLOP/s column uses it, so dense's figure is what a dense
kernel effectively achieves on the pruned layer.

Usage: python -m benchmarks.bench_bsr_dense_mm [--json results/bsr_dense_mm.json]
"""

import argparse
import os
import warnings

import torch

from benchmarks.common import interleaved_medians, print_table, write_json
from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
M = K = 2048
N = 256
BLOCK = 32


def run(density: float, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(M // BLOCK, K // BLOCK, generator=gen) < density
    mask = keep.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    w = torch.randn(M, K, generator=gen, dtype=dtype) * mask
    x = torch.randn(K, N, generator=gen, dtype=dtype)
    x_rows = x.t().contiguous()
    bsr = w.to_sparse_bsr((BLOCK, BLOCK))
    csr = w.to_sparse_csr()
    fields = (bsr.values(), bsr.crow_indices().int(), bsr.col_indices().int(), (M, K))

    expected = torch.mm(w, x)
    # Guards against timing a wrong kernel (float32 sums of up to 2048 products).
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(bsr_dense_mm(*fields, x), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(bsr_linear(*fields, x_rows), expected.t(), atol=tol, rtol=tol)
    times = interleaved_medians(
        {"dense": lambda: torch.mm(w, x),
         "torch_bsr": lambda: bsr @ x,
         "torch_csr": lambda: csr @ x,
         "pxkern": lambda: bsr_dense_mm(*fields, x),
         "linear": lambda: bsr_linear(*fields, x_rows)},
        warmup, repeats,
    )
    nnz_blocks = int(keep.sum())
    flop = 2 * nnz_blocks * BLOCK * BLOCK * N
    ideal = nnz_blocks / keep.numel() * times["dense"]
    return {
        "density": density,
        "block_density": nnz_blocks / keep.numel(),
        "nnz_blocks": nnz_blocks,
        "useful_flop": flop,
        **{f"{name}_ms": seconds * 1e3 for name, seconds in times.items()},
        "ideal_ms": ideal * 1e3,
        "pxkern_vs_ideal": times["pxkern"] / ideal,
        "linear_vs_ideal": times["linear"] / ideal,
        "speedup_vs_torch_bsr": times["torch_bsr"] / times["pxkern"],
        "speedup_vs_torch_csr": times["torch_csr"] / times["pxkern"],
        "speedup_vs_dense": times["dense"] / times["pxkern"],
        **{f"{name}_useful_gflops": flop / seconds / 1e9 for name, seconds in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write result rows as JSON")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not EXTENSION_AVAILABLE:
        raise SystemExit("pxkern extension not built: run `pip install --no-build-isolation -e .`")
    dtype = getattr(torch, args.dtype)

    print(f"W {M}x{K}, {BLOCK}x{BLOCK} blocks, X {K}x{N}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; times in ms, GF/s of useful work")
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (BSR|CSR) tensor support is in beta")
        for density in DENSITIES:
            rows.append(run(density, dtype, args.warmup, args.repeats))
    print_table(rows, [
        ("density", "density", ".2f"),
        ("dense_ms", "dense", ".3f"),
        ("ideal_ms", "ideal", ".3f"),
        ("torch_bsr_ms", "torch bsr", ".3f"),
        ("torch_csr_ms", "torch csr", ".3f"),
        ("pxkern_ms", "pxkern", ".3f"),
        ("linear_ms", "linear", ".3f"),
        ("pxkern_vs_ideal", "/ideal", ".2f"),
        ("linear_vs_ideal", "lin/ideal", ".2f"),
        ("speedup_vs_torch_bsr", "x bsr", ".1f"),
        ("speedup_vs_torch_csr", "x csr", ".1f"),
        ("speedup_vs_dense", "x dense", ".2f"),
        ("dense_useful_gflops", "dense GF/s", ".1f"),
        ("pxkern_useful_gflops", "pxkern GF/s", ".1f"),
        ("linear_useful_gflops", "linear GF/s", ".1f"),
    ])
    print("targets: /ideal <= 1.5 for densities 0.05-0.2; x bsr >= 2.5")

    config = {
        "m": M, "k": K, "n": N, "block": [BLOCK, BLOCK], "dtype": args.dtype,
        "warmup": args.warmup, "repeats": args.repeats,
        "pxkern_cpu_isa": os.environ.get("PXKERN_CPU_ISA", "auto"),
        "mkl": torch.backends.mkl.is_available(),
        "flop_model": "2 * nnz_blocks * bm * bn * N",
    }
    write_json(args.json, "bsr_dense_mm", config, rows)


if __name__ == "__main__":
    main()
