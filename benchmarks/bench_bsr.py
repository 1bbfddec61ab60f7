"""Benchmark pxkern bsr_dense_mm / bsr_linear against dense torch.mm and torch.sparse BSR/CSR.

W [M, K] times X [K, N], with W's bm x bm blocks kept at random at each block density
(--blocks 16 32 64, densities 0.5 0.2 0.1 0.05 0.02; a draw that keeps no block keeps
one, and every ratio uses the block density actually drawn). Shapes (--shapes picks by name):

  square2048      W 2048 x 2048, X 2048 x 256: the headline row (a ViT-B-sized linear
                  layer applied to 256 tokens), batch 1 only
  vit.qkv         2304 x  768  \
  vit.proj         768 x  768   | ViT-B linear layers, N = 197 tokens x batch
  vit.fc1         3072 x  768   |
  vit.fc2          768 x 3072  /
  r50.layer2.3x3   128 x 1152, 28x28 output  \  ResNet-50 convolutions as GEMMs,
  r50.layer3.3x3   256 x 2304, 14x14 output   | W [C_out, C_in*kh*kw] @
  r50.layer4.1x1  2048 x  512,  7x7 output   /  X [C_in*kh*kw, batch*H_out*W_out]

Every shape but the headline runs at batch 1 and 64. All kernels run in turn within each
of --repeats repeats (after --warmup); medians reported.

Caches (--cache): with "warm" (the default), each kernel's turn makes one untimed call
and then times the mean of 4 back-to-back calls, so its operands are in cache, as for a
layer reading what the previous layer has just written (the convention of
torch.utils.benchmark). With "cold", each turn times one call made right after the other
kernels', whose operands (16 MB for the dense 2048x2048 weight) have pushed its own out
of the caches. The sparse products at low density are the ones this changes: at block
density 0.05 the headline product does 107 MFLOP but moves x and y, 4 MB, through
memory. Batch-64 cases are always timed cold: their operands (x alone is 38 MB for
vit.fc1) do not fit in cache anyway.

They all allocate their output from pxkern's pool of large CPU blocks (pxkern.memory), so
that none pays first-touch page faults for it: for a 2048x256 float32 output those cost
~0.15 ms per call on this VM, nothing to the dense product but 10-20% of a sparse one at
block density 0.05.

  dense      torch.mm(W, X) on the dense W (MKL), the time a dense kernel spends on W
  ideal      density * dense: what skipping the zero blocks would save at dense speed
  torch_bsr  W.to_sparse_bsr((bm, bm)) @ X
  torch_csr  W.to_sparse_csr() @ X
  pxkern     bsr_dense_mm(W's BSR fields, X)
  linear     bsr_linear(W's BSR fields, X^T), the same product in the nn.Linear layout,
             given the transposed blocks as pxkern.sparse.BlockSparseLinear keeps them

The full grid is large for a small machine (a batch-64 ViT fc1 product is ~60 GFLOP of
dense work and torch CSR takes ~20x that time at density 0.5), so to keep the default run
near 10 minutes on 2 cores (12.5 minutes measured on a 2-core VM that was throttled to
about one core; --shapes and --blocks cut it further):
  - batch-64 cases run --big-repeats (default 1) cold repeats and no warm-up beyond the
    correctness check, which already calls dense, pxkern and linear once;
  - at batch 64 torch CSR, which ignores the block structure, is timed at 32x32 blocks
    only (about 4 more minutes with --full-csr); the other rows show "-" / null.
--quick: the headline shape only, 32x32 blocks, 3 repeats unless --repeats says (about 10 s).

"/ideal" is the ratio of median times. "best /ideal" divides the fastest pxkern repeat by
density times the fastest dense one: on a shared VM whose neighbours take its cores and
caches in bursts, the medians of the same code moved by up to 1.7x between runs minutes
apart, while the fastest repeats show what the code does when left alone.

FLOP model (useful work): 2 * nnz_blocks * bm * bn * N, one multiply-add per stored
weight per column of X; every GFLOP/s column uses it, so dense's figure is what a dense
kernel effectively achieves on the pruned layer.

--plot PATH: for the headline shape, one panel per block size, time against block
density on log-log axes: dense (flat), ideal (density * dense), torch BSR, torch CSR and
pxkern.

Usage: python -m benchmarks.bench_bsr [--quick] [--shapes NAME ...] [--blocks 16 32 64]
       [--cache warm|cold] [--json results/bsr.json] [--plot results/bsr.png]
"""

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from benchmarks.common import (
    interleaved_times,
    prepare_kernel_benchmark,
    print_table,
    pyplot,
    save_figure,
    write_json,
)
from pxkern.memory import reused_cpu_memory
from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
BLOCKS = (16, 32, 64)
BIG_BATCH = 64
CSR_BLOCK = 32  # the one block size at which batch-64 cases time torch CSR by default
WARM_CALLS = 4  # timed back-to-back calls per turn with --cache warm


@dataclass(frozen=True)
class Shape:
    name: str
    m: int
    k: int
    n_per_sample: int  # columns of X per batch element: tokens or output pixels
    batches: tuple[int, ...] = (1, BIG_BATCH)


HEADLINE = Shape("square2048", 2048, 2048, 256, (1,))
SHAPES = (
    HEADLINE,
    Shape("vit.qkv", 2304, 768, 197),
    Shape("vit.proj", 768, 768, 197),
    Shape("vit.fc1", 3072, 768, 197),
    Shape("vit.fc2", 768, 3072, 197),
    Shape("r50.layer2.3x3", 128, 128 * 9, 28 * 28),
    Shape("r50.layer3.3x3", 256, 256 * 9, 14 * 14),
    Shape("r50.layer4.1x1", 2048, 512, 7 * 7),
)


def run(shape: Shape, batch: int, block: int, density: float, dtype: torch.dtype,
        warmup: int, repeats: int, time_csr: bool, warm: bool) -> dict:
    m, k, n = shape.m, shape.k, shape.n_per_sample * batch
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(m // block, k // block, generator=gen) < density
    if not keep.any():  # small grids (r50.layer2.3x3 has 2 x 18 blocks of 64x64) may draw none
        keep[0, 0] = True
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    w = torch.randn(m, k, generator=gen, dtype=dtype) * mask
    x = torch.randn(k, n, generator=gen, dtype=dtype)
    x_rows = x.t().contiguous()
    bsr = w.to_sparse_bsr((block, block))
    fields = (bsr.values(), bsr.crow_indices().int(), bsr.col_indices().int(), (m, k))

    expected = torch.mm(w, x)
    # Guards against timing a wrong kernel (float32 sums of up to 3072 products).
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(bsr_dense_mm(*fields, x), expected, atol=tol, rtol=tol)
    blocks = fields[0].transpose(1, 2).contiguous()
    torch.testing.assert_close(bsr_linear(*fields, x_rows, transposed_blocks=blocks), expected.t(), atol=tol, rtol=tol)
    del expected
    kernels = {"dense": lambda: torch.mm(w, x), "torch_bsr": lambda: bsr @ x}
    if time_csr:
        csr = w.to_sparse_csr()
        kernels["torch_csr"] = lambda: csr @ x
    kernels["pxkern"] = lambda: bsr_dense_mm(*fields, x)
    kernels["linear"] = lambda: bsr_linear(*fields, x_rows, transposed_blocks=blocks)
    with reused_cpu_memory():
        samples = interleaved_times(kernels, warmup, repeats, WARM_CALLS if warm else 0)
    times = {name: statistics.median(values) for name, values in samples.items()}
    times.setdefault("torch_csr", None)

    nnz_blocks = int(keep.sum())
    block_density = nnz_blocks / keep.numel()
    flop = 2 * nnz_blocks * block * block * n
    ideal = block_density * times["dense"]
    pxkern = times["pxkern"]
    # The fastest repeats: the code's speed with the machine's interruptions left out.
    best_vs_ideal = min(samples["pxkern"]) / (block_density * min(samples["dense"]))
    return {
        "shape": shape.name,
        "m": m, "k": k, "n": n,
        "batch": batch,
        "block": block,
        "density": density,
        "block_density": block_density,
        "nnz_blocks": nnz_blocks,
        "useful_flop": flop,
        "repeats": repeats,
        "cache": "warm" if warm else "cold",
        **{f"{name}_ms": _scaled(seconds, 1e3) for name, seconds in times.items()},
        "ideal_ms": ideal * 1e3,
        "pxkern_vs_ideal": pxkern / ideal,
        "linear_vs_ideal": times["linear"] / ideal,
        "best_pxkern_vs_ideal": best_vs_ideal,
        "speedup_vs_torch_bsr": times["torch_bsr"] / pxkern,
        "speedup_vs_torch_csr": _scaled(times["torch_csr"], 1 / pxkern),
        "speedup_vs_dense": times["dense"] / pxkern,
        **{f"{name}_useful_gflops": None if seconds is None else flop / seconds / 1e9
           for name, seconds in times.items()},
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


COLUMNS = (
    ("shape", "shape", ""),
    ("batch", "B", "d"),
    ("n", "N", "d"),
    ("block", "blk", "d"),
    ("density", "density", ".2f"),
    ("dense_ms", "dense", ".3f"),
    ("ideal_ms", "ideal", ".3f"),
    ("torch_bsr_ms", "torch bsr", ".3f"),
    ("torch_csr_ms", "torch csr", ".3f"),
    ("pxkern_ms", "pxkern", ".3f"),
    ("linear_ms", "linear", ".3f"),
    ("pxkern_vs_ideal", "/ideal", ".2f"),
    ("linear_vs_ideal", "lin/ideal", ".2f"),
    ("best_pxkern_vs_ideal", "best /ideal", ".2f"),
    ("speedup_vs_torch_bsr", "x bsr", ".1f"),
    ("speedup_vs_torch_csr", "x csr", ".1f"),
    ("speedup_vs_dense", "x dense", ".2f"),
    ("dense_useful_gflops", "dense GF/s", ".1f"),
    ("pxkern_useful_gflops", "pxkern GF/s", ".1f"),
    ("linear_useful_gflops", "linear GF/s", ".1f"),
)
SUMMARY_DENSITIES = (0.2, 0.1, 0.05)
SUMMARY_COLUMNS = tuple(c for c in COLUMNS if c[0] in (
    "shape", "batch", "n", "block", "density", "dense_ms", "torch_bsr_ms", "pxkern_ms",
    "pxkern_vs_ideal", "linear_vs_ideal", "best_pxkern_vs_ideal", "speedup_vs_torch_bsr", "speedup_vs_torch_csr",
    "speedup_vs_dense"))


def plot_density_sweep(path: str | None, rows: list[dict], shape: Shape) -> None:
    """Time against block density, log-log, one panel per block size, for ``shape``."""
    if not path:
        return
    rows = [r for r in rows if r["shape"] == shape.name]
    if not rows:
        print(f"no {shape.name} rows: no plot written")
        return
    from matplotlib.ticker import NullFormatter

    plt = pyplot()

    blocks = sorted({r["block"] for r in rows})
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks) + 0.5, 4.2),
                             sharey=True, squeeze=False)
    for ax, block in zip(axes[0], blocks):
        sweep = sorted((r for r in rows if r["block"] == block), key=lambda r: r["block_density"])
        x = [r["block_density"] for r in sweep]
        # Dense work does not depend on the density: one flat line at the median time.
        dense = statistics.median(r["dense_ms"] for r in sweep)
        ax.plot(x, [dense] * len(x), "k-", label="dense torch.mm")
        ax.plot(x, [d * dense for d in x], "k--", label="ideal (density x dense)")
        for key, label, style in (("torch_bsr_ms", "torch BSR", "s-"),
                                  ("torch_csr_ms", "torch CSR", "^-"),
                                  ("pxkern_ms", "pxkern bsr_dense_mm", "o-")):
            points = [(d, r[key]) for d, r in zip(x, sweep) if r[key] is not None]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(DENSITIES, [f"{d:g}" for d in DENSITIES])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("block density")
        ax.set_title(f"{block}x{block} blocks")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time (ms)")
    axes[0][0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"W {first['m']}x{first['k']} @ X {first['k']}x{first['n']}, "
                 f"{torch.get_num_threads()} threads (lower is better)")
    save_figure(plt, fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write result rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="save the headline density sweep as a PNG")
    parser.add_argument("--quick", action="store_true",
                        help=f"{HEADLINE.name} only, 32x32 blocks, 3 repeats")
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], metavar="NAME",
                        help=f"shapes to run (default: all): {' '.join(s.name for s in SHAPES)}")
    parser.add_argument("--blocks", nargs="+", type=int, choices=BLOCKS, help="block sizes (default: 16 32 64)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="repeats of batch-1 cases (default 15, 3 with --quick)")
    parser.add_argument("--big-repeats", type=int, default=1, help=f"repeats of batch-{BIG_BATCH} cases")
    parser.add_argument("--full-csr", action="store_true",
                        help=f"time torch CSR at batch {BIG_BATCH} for every block size")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="operands in cache (back-to-back calls) or not; see above")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    prepare_kernel_benchmark(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [s for s in SHAPES if s.name in (args.shapes or ([HEADLINE.name] if args.quick else
                                                             [s.name for s in SHAPES]))]
    blocks = sorted(set(args.blocks or ((32,) if args.quick else BLOCKS)))
    repeats = args.repeats or (3 if args.quick else 15)
    big_repeats = min(args.big_repeats, repeats)

    print(f"{args.dtype}, {torch.get_num_threads()} threads, {args.cache} caches at batch 1; "
          f"times in ms, GF/s of useful work")
    rows = []
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (BSR|CSR) tensor support is in beta")
        for shape in shapes:
            for batch in shape.batches:
                big = batch >= BIG_BATCH
                for block in blocks:
                    print(f"\n{shape.name}: W {shape.m}x{shape.k}, {block}x{block} blocks, "
                          f"X {shape.k}x{shape.n_per_sample * batch} (batch {batch}); "
                          f"{time.perf_counter() - start:.0f} s elapsed", flush=True)
                    case = [run(shape, batch, block, density, dtype,
                                0 if big else args.warmup, big_repeats if big else repeats,
                                time_csr=not big or args.full_csr or block == CSR_BLOCK,
                                warm=args.cache == "warm" and not big)
                            for density in DENSITIES]
                    print_table(case, COLUMNS[4:])
                    rows.extend(case)

    print(f"\nall cases: {time.perf_counter() - start:.0f} s")
    summary_block = 32 if 32 in blocks else blocks[0]
    print(f"\nsummary, {summary_block}x{summary_block} blocks, densities "
          f"{' '.join(map(str, SUMMARY_DENSITIES))}:")
    print_table([r for r in rows if r["block"] == summary_block and r["density"] in SUMMARY_DENSITIES],
                SUMMARY_COLUMNS)
    print("targets: /ideal <= 1.5 for densities 0.05-0.2; x bsr >= 2.5")

    config = {
        "shapes": {s.name: {"m": s.m, "k": s.k, "n_per_sample": s.n_per_sample, "batches": list(s.batches)}
                   for s in shapes},
        "headline": HEADLINE.name, "blocks": blocks, "densities": list(DENSITIES),
        "dtype": args.dtype, "quick": args.quick,
        "warmup": args.warmup, "repeats": repeats, "cache": args.cache, "warm_calls": WARM_CALLS,
        "big_batch": {"batch": BIG_BATCH, "warmup": 0, "repeats": big_repeats,
                      "torch_csr_blocks": blocks if args.full_csr else [CSR_BLOCK]},
        "pxkern_cpu_isa": os.environ.get("PXKERN_CPU_ISA", "auto"),
        "mkl": torch.backends.mkl.is_available(),
        "flop_model": "2 * nnz_blocks * bm * bn * N",
    }
    write_json(args.json, "bsr_dense_mm", config, rows)
    plot_density_sweep(args.plot, rows, HEADLINE)


if __name__ == "__main__":
    main()
