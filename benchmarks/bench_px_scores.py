"""PX scoring and the 100-round PX prune, against the authors' algorithm, in one run.

For each model, on one batch:
- ``forward``: one eval-mode forward of the model (no autograd), the unit of cost;
- ``pxkern``: ``pxkern.px_scores``;
- ``authors``: the authors' algorithm in plain PyTorch (``pxkern.testing.reference_px_scores``
  in float32: three deep copies of the model, patched ReLU, stream C over the whole batch,
  autograd), as the official code runs it per batch.
Then the whole iterative prune of ResNet-20 to density 0.018 in 100 rounds: ``pxkern.prune``
against the same loop around the authors' algorithm (score, global top-k, combine masks),
timed pxkern, authors, pxkern (after one untimed round of each), with the mean of the two
pxkern runs.

``--breakdown`` instead profiles one pxkern prune (``torch.profiler``, which adds a few
percent) and shows, per round, the time of the scoring path's stages (the fused plan's
forward and backward, or streams A, B and C on the stream path), of the rest of
``px_scores`` and of the mask selection, in eval forwards: where the prune's time goes.
It then sums, over the whole prune, the kernels every exact evaluation of the streams
runs (the convolutions of A and B with the faster of oneDNN and ``sparse_conv2d``, C's,
the ReLU gates), times the authors' loop once, and prints the speedup a prune that ran
nothing but those kernels would reach: the ceiling of this algorithm on these kernels.

Every time is the median of ``--repeats`` runs after one warm-up; the forward, pxkern and
the authors' algorithm run in turn within each repeat, so machine drift hits all alike. The authors' float32
streams overflow on these networks (px-spec.md section 5): their scores are timed, not used.

Usage: python -m benchmarks.bench_px_scores [--quick] [--json results/px_scores.json]
       [--plot results/px_scores.png]
       python -m benchmarks.bench_px_scores --breakdown [--rounds 100] [--json ...] [--plot ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.common import (
    interleaved_medians,
    interleaved_times,
    median_seconds,
    plot_bars,
    plot_stacked,
    print_table,
    write_json,
)
from pxkern import px_scores
from pxkern.models import cifar_resnet, cifar_vgg, resnet18
from pxkern.pruning import prune
from pxkern.pruning.prune import ROUND_LABELS
from pxkern.pruning.schedule import exponential_densities
from pxkern.pruning.threshold import global_threshold
from pxkern.px.fused import PLAN_LABELS
from pxkern.px.scores import STAGE_LABELS
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
    """The official loop: score with the current masks, keep the global top fraction, as
    the official code selects it (kthvalue over all scores, then a comparison per tensor;
    not pxkern's keep_top kernel). Its float32 scores hold inf/NaN; nan_to_num lets the
    loop run its full course."""
    masks = None
    for round_density in exponential_densities(density, rounds):
        scores = {k: torch.nan_to_num(v) for k, v in authors_px_scores(model, x, masks).items()}
        threshold = global_threshold(scores, round_density)
        keep = {k: v > threshold for k, v in scores.items()}
        masks = keep if masks is None else {k: keep[k] & masks[k] for k in keep}
    return masks


def prune_row(rounds: int, quick: bool) -> dict:
    base, x = _prune_inputs(quick)
    with torch.no_grad():
        forward = median_seconds(lambda: base.eval()(x), repeats=3)
    def ours_once() -> float:
        return median_seconds(lambda: prune(copy.deepcopy(base), x, density=0.018, rounds=rounds,
                                            progress=False), warmup=0, repeats=1)

    # One round of each loop first, untimed: the first autograd call with a cotangent in a
    # process imports sympy (torch.autograd._make_grads, ~0.4 s here), and libraries set
    # up their kernels on first use; whichever loop ran first would pay for both.
    prune(copy.deepcopy(base), x, density=0.018, rounds=1, progress=False)
    authors_prune(base, x, 0.018, 1)
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


# The parts of a round: the stages of whichever path scored (the fused plan, which the
# CPU prune runs, or the stream path for models the plan does not run), the rest of
# px_scores (setup) and the mask selection.
PATH_STAGES = (
    ("program", "plan program", PLAN_LABELS["program"]),
    ("forward", "plan forward", PLAN_LABELS["forward"]), ("backward", "plan backward", PLAN_LABELS["backward"]),
    ("A", "stream A", STAGE_LABELS["A"]), ("B", "stream B", STAGE_LABELS["B"]), ("C", "stream C", STAGE_LABELS["C"]),
)
STAGES = tuple((key, name) for key, name, _ in PATH_STAGES) + (("setup", "setup"), ("select", "select"))

# The kernels of an exact evaluation of the streams on the CPU, by profiler op name and
# input dtype: A and B run float32 convolutions (oneDNN, or sparse_conv2d where it
# measured faster), C float64 ones (ATen's slow_conv2d, which oneDNN lacks, or
# sparse_conv2d). An executor that runs these kernels cannot skip them; everything else a
# round does (residual adds, BatchNorm, rescaling, mask selection, Python) is overhead
# that a leaner one could cut. ResNet-20's one Linear layer, the 64x10 classifier, costs
# microseconds and is not counted.
KERNEL_GROUPS = ("A and B convolutions", "C convolutions", "ReLU gates")
_CONVOLUTIONS = frozenset({"aten::mkldnn_convolution", "pxkern::sparse_conv2d", "aten::_slow_conv2d_forward",
                           "aten::_slow_conv2d_backward"})
_GATES = frozenset({"pxkern::relu_gate", "pxkern::gate_streams"})


def _kernel_group(event) -> str | None:
    """The KERNEL_GROUPS entry of a profiler event (recorded with its input dtypes)."""
    if event.name in _GATES:
        return "ReLU gates"
    if event.name in _CONVOLUTIONS:
        return "C convolutions" if event.input_dtypes[:1] == ["double"] else "A and B convolutions"
    return None


def _ranges(profile, label: str) -> list:
    """The profiler ranges named ``label``, in the order they began."""
    return sorted((e.time_range for e in profile.events() if e.name == label), key=lambda r: r.start)


def _seconds_within(ranges: list, outer) -> float:
    """Seconds of the ``ranges`` that began inside the range ``outer``."""
    return sum(r.elapsed_us() for r in ranges if outer.start <= r.start < outer.end) * 1e-6


def _kernel_seconds(profile) -> dict[str, float]:
    """Self time (s) of each group of KERNEL_GROUPS in ``profile``."""
    totals = dict.fromkeys(KERNEL_GROUPS, 0.0)
    for event in profile.events():
        group = _kernel_group(event)
        if group is not None:
            totals[group] += event.self_cpu_time_total * 1e-6
    return totals


def _prune_inputs(quick: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return cifar_resnet(20), torch.randn(32 if quick else 128, 3, 32, 32)


def prune_breakdown(rounds: int, quick: bool) -> tuple[list[dict], dict[str, float]]:
    """One ``pxkern.prune`` of the benchmark's ResNet-20 under ``torch.profiler``: per round,
    the time of each stage of PATH_STAGES (zero for the path that did not run), of the rest
    of ``px_scores`` (setup: checks, parameter substitutions) and of selecting the masks,
    each also in eval forwards of the model;
    and the seconds of each kernel group (KERNEL_GROUPS) over the whole prune."""
    base, x = _prune_inputs(quick)

    def forward_times() -> list[float]:
        with torch.no_grad():
            return interleaved_times({"forward": lambda: base.eval()(x)}, repeats=5)["forward"]

    # A warm-up prune: the first calls measure which convolution kernel wins (sparse_conv2d).
    prune(copy.deepcopy(base), x, density=0.018, rounds=rounds, progress=False)
    before = forward_times()
    # Input dtypes tell C's convolutions (float64) from A's and B's.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        prune(copy.deepcopy(base), x, density=0.018, rounds=rounds, progress=False)
    # Forwards before and after the prune: one unlucky spell of the machine moves the median
    # of ten less than that of a few taken at one moment.
    forward = statistics.median(before + forward_times())
    stage_ranges = {key: _ranges(profile, label) for key, _, label in PATH_STAGES}
    select = _ranges(profile, ROUND_LABELS["select"])
    rows = []
    for index, score in enumerate(_ranges(profile, ROUND_LABELS["score"])):
        seconds = {key: _seconds_within(ranges, score) for key, ranges in stage_ranges.items()}
        seconds["setup"] = score.elapsed_us() * 1e-6 - sum(seconds.values())
        seconds["select"] = select[index].elapsed_us() * 1e-6
        row = {"round": index + 1, "forward_ms": forward * 1e3}
        for key, _ in STAGES:
            row[f"{key}_ms"] = seconds[key] * 1e3
            row[f"{key}_per_forward"] = seconds[key] / forward
        row["round_per_forward"] = sum(seconds.values()) / forward
        rows.append(row)
    return rows, _kernel_seconds(profile)


def _stages_run(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """The stages that took time in some round (one path's, setup and select)."""
    return tuple((key, name) for key, name in STAGES if any(r[f"{key}_ms"] > 0 for r in rows))


def print_breakdown(rows: list[dict]) -> None:
    """Selected rounds and the mean round, in eval forwards."""
    shown = sorted({1, *range(10, len(rows) + 1, 10), len(rows)})
    mean = {key: sum(r[key] for r in rows) / len(rows)
            for key in rows[0] if key.endswith("_per_forward")}
    table = [rows[r - 1] for r in shown] + [{"round": "mean", **mean}]
    columns = [("round", "round", "")] + [(f"{key}_per_forward", name, ".2f") for key, name in _stages_run(rows)]
    print(f"\nWhere a prune round's time goes, in eval forwards ({rows[0]['forward_ms']:.1f} ms each)")
    print_table(table, [*columns, ("round_per_forward", "total", ".2f")])


COLUMNS = (
    ("model", "model", ""), ("batch", "B", "d"), ("forward_ms", "forward ms", ".1f"),
    ("pxkern_ms", "pxkern ms", ".1f"), ("authors_ms", "authors ms", ".1f"),
    ("pxkern_per_forward", "pxkern/fwd", ".2f"), ("authors_per_forward", "authors/fwd", ".2f"),
    ("speedup_vs_authors", "speedup", ".2f"),
)


def kernel_ceiling(kernels: dict[str, float], rows: list[dict], rounds: int, quick: bool) -> dict:
    """The profiled prune's kernel time against the authors' loop, timed once here (after
    one untimed round, as in the prune row): the speedup of a prune that ran nothing but
    the kernels, and of the profiled prune itself."""
    base, x = _prune_inputs(quick)
    authors_prune(base, x, 0.018, 1)
    authors = median_seconds(lambda: authors_prune(base, x, 0.018, rounds), warmup=0, repeats=1)
    prune_seconds = sum(r[f"{key}_ms"] for r in rows for key, _ in STAGES) * 1e-3
    floor = sum(kernels.values())
    print(f"\nKernels over the whole prune (profiled), against the authors' loop ({authors:.2f} s)")
    table = [{"part": name, "seconds": seconds, "share": seconds / prune_seconds} for name, seconds in kernels.items()]
    table += [{"part": "the kernels together", "seconds": floor, "share": floor / prune_seconds},
              {"part": "the profiled prune", "seconds": prune_seconds, "share": 1.0}]
    print_table(table, [("part", "part", ""), ("seconds", "seconds", ".2f"), ("share", "share of prune", ".2f")])
    print(f"a prune that ran only these kernels: {authors / floor:.2f}x faster than the authors' loop "
          f"(the profiled prune: {authors / prune_seconds:.2f}x)")
    return {"kernel_seconds": kernels, "kernels_total_s": floor, "prune_profiled_s": prune_seconds,
            "authors_s": authors, "ceiling_speedup": authors / floor, "profiled_speedup": authors / prune_seconds}


def breakdown(rounds: int, args: argparse.Namespace) -> None:
    if rounds < 1:
        raise SystemExit("--breakdown needs --rounds >= 1")
    rows, kernels = prune_breakdown(rounds, args.quick)
    print_breakdown(rows)
    summary = kernel_ceiling(kernels, rows, rounds, args.quick)
    write_json(args.json, "px_prune_breakdown", {"quick": args.quick, "rounds": rounds}, rows, summary)
    plot_stacked(
        args.plot, f"pxkern.prune of ResNet-20 (B={128 // 4 if args.quick else 128}): time per round",
        [r["round"] for r in rows], {name: [r[f"{key}_per_forward"] for r in rows] for key, name in _stages_run(rows)},
        "round", "time / one eval forward",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="quarter batches, 5 prune rounds, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100, help="prune rounds (0 skips the prune)")
    parser.add_argument("--models", nargs="*", default=[c.name for c in CASES])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="save a bar chart of the ratios to this PNG file")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: profile one pxkern prune of --rounds rounds and show where each "
                             "round's time goes (table; --json rows per round; --plot stacked areas)")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    rounds = min(args.rounds, 5) if args.quick else args.rounds
    if args.breakdown:
        breakdown(rounds, args)
        return

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
