"""PX scoring and the 100-round PX prune, against the authors' algorithm, in one run.

For each model, on one batch:
- ``forward``: one eval-mode forward of the model (no autograd), the unit of cost;
- ``pxkern``: ``pxkern.px_scores``;
- ``authors``: the authors' algorithm in plain PyTorch (``pxkern.testing.reference_px_scores``
  in float32: three deep copies of the model, patched ReLU, stream C over the whole batch,
  autograd), as the official code runs it per batch.
Then the whole iterative prune of ResNet-20 to density 0.018 in 100 rounds: ``pxkern.prune``
against the same loop around the authors' algorithm (score, global top-k, combine masks),
timed pxkern, authors, pxkern, with the mean of the two pxkern runs.

Every time is the median of ``--repeats`` runs after one warm-up; the forward, pxkern and
the authors' algorithm run in turn within each repeat, so machine drift hits all alike. The authors' float32
streams overflow on these networks (px-spec.md section 5): their scores are timed, not used.

Usage: python -m benchmarks.bench_px_scores [--quick] [--json results/px_scores.json]
       [--plot results/px_scores.png]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.common import interleaved_medians, median_seconds, plot_bars, print_table, write_json
from pxkern import px_scores
from pxkern.models import cifar_resnet, cifar_vgg, resnet18
from pxkern.pruning import prune
from pxkern.pruning.schedule import exponential_densities
from pxkern.pruning.threshold import global_keep_masks
from pxkern.testing import reference_px_scores


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: int
    image: int


CASES = (
    Case("resnet20", lambda: cifar_resnet(20), 128, 32),
    Case("vgg16_bn", lambda: cifar_vgg(16, bn=True), 64, 32),
    Case("resnet18@64px", lambda: resnet18(num_classes=200), 64, 64),
)


def authors_px_scores(model: nn.Module, x: torch.Tensor, masks=None) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 overflow warnings are expected here
        return reference_px_scores(model, x, masks=masks, dtype=torch.float32)


def score_row(case: Case, repeats: int, quick: bool) -> dict:
    torch.manual_seed(0)
    model = case.build().eval()
    batch = case.batch // 4 if quick else case.batch
    x = torch.randn(batch, 3, case.image, case.image)
    def forward_pass():
        with torch.no_grad():
            model(x)

    times = interleaved_medians(
        {"forward": forward_pass, "pxkern": lambda: px_scores(model, x),
         "authors": lambda: authors_px_scores(model, x)},
        repeats=repeats,
    )
    forward, ours, authors = times["forward"], times["pxkern"], times["authors"]
    return {
        "model": case.name, "batch": batch, "forward_ms": forward * 1e3,
        "pxkern_ms": ours * 1e3, "authors_ms": authors * 1e3,
        "pxkern_per_forward": ours / forward, "authors_per_forward": authors / forward,
        "speedup_vs_authors": authors / ours,
    }


def authors_prune(model: nn.Module, x: torch.Tensor, density: float, rounds: int) -> dict:
    """The official loop: score with the current masks, keep the global top fraction.
    Its float32 scores hold inf/NaN; nan_to_num lets the loop run its full course."""
    masks = None
    for round_density in exponential_densities(density, rounds):
        scores = {k: torch.nan_to_num(v) for k, v in authors_px_scores(model, x, masks).items()}
        keep = global_keep_masks(scores, round_density)
        masks = keep if masks is None else {k: keep[k] & masks[k] for k in keep}
    return masks


def prune_row(rounds: int, quick: bool) -> dict:
    torch.manual_seed(0)
    base = cifar_resnet(20)
    x = torch.randn(32 if quick else 128, 3, 32, 32)
    with torch.no_grad():
        forward = median_seconds(lambda: base.eval()(x), repeats=3)
    def ours_once() -> float:
        return median_seconds(lambda: prune(copy.deepcopy(base), x, density=0.018, rounds=rounds,
                                            progress=False), warmup=0, repeats=1)

    # pxkern, authors, pxkern: a drift of the machine's speed that is linear over the
    # minutes the three loops take cancels in the ratio to the mean of the two pxkern runs.
    first = ours_once()
    authors = median_seconds(lambda: authors_prune(base, x, 0.018, rounds), warmup=0, repeats=1)
    ours = (first + ours_once()) / 2
    return {
        "model": f"resnet20 prune {rounds} rounds", "batch": len(x), "rounds": rounds, "forward_ms": forward * 1e3,
        "pxkern_ms": ours * 1e3, "authors_ms": authors * 1e3,
        "pxkern_per_forward": ours / forward, "authors_per_forward": authors / forward,
        "speedup_vs_authors": authors / ours,
    }


COLUMNS = (
    ("model", "model", ""), ("batch", "B", "d"), ("forward_ms", "forward ms", ".1f"),
    ("pxkern_ms", "pxkern ms", ".1f"), ("authors_ms", "authors ms", ".1f"),
    ("pxkern_per_forward", "pxkern/fwd", ".2f"), ("authors_per_forward", "authors/fwd", ".2f"),
    ("speedup_vs_authors", "speedup", ".2f"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="quarter batches, 5 prune rounds, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100, help="prune rounds (0 skips the prune)")
    parser.add_argument("--models", nargs="*", default=[c.name for c in CASES])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="save a bar chart of the ratios to this PNG file")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    rounds = min(args.rounds, 5) if args.quick else args.rounds

    rows = []
    for case in CASES:
        if case.name in args.models:
            rows.append(score_row(case, repeats, args.quick))
            print_table(rows[-1:], COLUMNS)
    if rounds:
        rows.append(prune_row(rounds, args.quick))
    print("\nPX scoring: time per call, as a multiple of one eval forward, and pxkern's speedup")
    print_table(rows, COLUMNS)
    write_json(args.json, "px_scores", {"quick": args.quick, "repeats": repeats, "rounds": rounds}, rows)
    # The prune row is shown per round, so that every bar is one scoring.
    per_scoring = [r.get("rounds", 1) for r in rows]
    plot_bars(
        args.plot, "PX scoring cost in eval forwards of the same model and batch (lower is better)",
        [f"{r['model']}\nB={r['batch']}" + ("\n(per round)" if "rounds" in r else "") for r in rows],
        {"pxkern": [r["pxkern_per_forward"] / n for r, n in zip(rows, per_scoring)],
         "authors' algorithm": [r["authors_per_forward"] / n for r, n in zip(rows, per_scoring)]},
        "time / one eval forward",
    )


if __name__ == "__main__":
    main()
