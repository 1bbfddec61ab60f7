"""The ``pxkern`` command line: ``pxkern demo [...]``."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from pxkern.demo import DemoReport, run_demo
from pxkern.pruning import CRITERIA


def _density(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _block(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"block must look like 8x8 (rows x columns), got {text}")
    return int(parts[0]), int(parts[1])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pxkern", description="PX pruning at initialization for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="prune and train a small CNN on scikit-learn's digits (offline, CPU, < 2 minutes)",
        description="Prune a small BN CNN at initialization on scikit-learn's digits (scored on "
        "10 training images per class), train it briefly with the masks fixed, and compare "
        "its test accuracy with the dense network.",
    )
    demo.add_argument("--method", choices=list(CRITERIA), default="px", help="pruning criterion (default: px)")
    demo.add_argument("--density", type=_density, default=0.05, help="fraction of weights kept (default: 0.05)")
    demo.add_argument(
        "--rounds", type=_positive_int, default=20,
        help="pruning rounds of px and synflow (default: 20); the other methods run one-shot as in the official code",
    )
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs (default: 10)")
    demo.add_argument("--out", default="results", help="directory for plots and JSON (default: results/)")
    demo.add_argument("--compare", action="store_true", help="run every method at the same density")
    demo.add_argument("--seed", type=int, default=0, help="split, initialization and subset seed (default: 0)")
    demo.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads (default: 1; the demo's tensors are tiny, and one thread is as "
        "fast as two on an idle machine and far faster on a busy one)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the pruning progress bars")
    demo.add_argument(
        "--block", type=_block, default=None, metavar="BMxBN",
        help="also prune whole BMxBN weight blocks (e.g. 8x8) and compare with unstructured pruning",
    )
    demo.add_argument(
        "--keep", choices=("classifier", "none"), default="classifier",
        help="what px keeps unchanged in its streams B and C besides normalization layers: the "
        "classifier (px-spec.md, default) or nothing, as an earlier version of the authors' code "
        "does (docs/px-spec-vs-official-code.md); other methods ignore it",
    )
    return parser


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: DemoReport) -> str:
    """The demo's measurements as text."""
    lines = [
        f"digits: {report.train_size} train / {report.test_size} test images (8x8); "
        f"CNN with {report.prunable_weights:,} prunable weights; scored on {report.scoring_size} "
        f"training images (class-balanced); {report.epochs} training epochs each",
        f"dense: test accuracy {report.dense_accuracy:.4f} (trained in {report.dense_seconds:.1f} s)",
        "",
        _table(
            ["method", "rounds", "density", "test acc", "acc - dense", "prune s", "train s"],
            [
                [r.label, r.rounds, f"{r.density:.4f}", f"{r.accuracy:.4f}",
                 f"{r.accuracy - report.dense_accuracy:+.4f}", f"{r.prune_seconds:.2f}", f"{r.train_seconds:.1f}"]
                for r in report.results
            ],
        ),
    ]
    for r in report.results:
        lines += [
            "",
            f"density per layer ({r.label}):",
            _table(
                ["layer", "kept", "total", "density"],
                [[layer.name, layer.kept, layer.total, f"{layer.density:.4f}"] for layer in r.layers],
            ),
        ]
    lines += ["", "wrote: " + ", ".join(str(path) for path in report.files)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        torch.set_num_threads(args.threads)
        report = run_demo(
            args.method, args.density, args.rounds, args.epochs, args.out,
            compare=args.compare, seed=args.seed, progress=not args.no_progress, block=args.block,
            keep_classifier=args.keep == "classifier",
        )
        print(format_report(report))
    return 0
