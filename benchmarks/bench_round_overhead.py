"""How much of a PX prune round is not kernels: each chosen round's scoring against its
kernel calls replayed back to back.

The 100-round PX prune of ResNet-20 (B=128, density 0.018) runs its rounds as
``pxkern.prune`` does (plans reused, memory reused), keeping the masks each chosen round
scores with. At each of them it times ``px_scores`` (median of ``--repeats``), records
the kernel calls of one scoring at the dispatcher (A's, B's and C's convolutions, the
gates, C's convolution backward: ``KERNELS``) and replays those calls back to back with
the recorded arguments, without the Python and the small PyTorch ops around them. The
difference is what an executor that ran the same kernels with no overhead would save: the
budget of a compiled executor of the fused plan (``docs/prune-performance.md``).

Usage: python -m benchmarks.bench_round_overhead [--quick] [--rounds 1 10 25 50 75 100]
       [--json results/round_overhead.json] [--plot results/round_overhead.png]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import median_seconds, plot_bars, print_table, write_json
from pxkern import px_scores
from pxkern.memory import reused_cpu_memory
from pxkern.models import cifar_resnet
from pxkern.px.fused import plans_reused
from pxkern.pruning import prune_rounds

# Dispatcher names (without overload) of the calls an exact evaluation of the streams
# cannot skip: every convolution goes through aten::convolution, whichever kernel
# (oneDNN, ATen's float64 path) runs below it.
KERNELS = frozenset({"convolution", "sparse_conv2d", "gate_streams", "convolution_backward"})

Call = tuple[Callable[..., Any], tuple, dict]


class _KernelCalls(TorchDispatchMode):
    """Records the KERNELS calls made under it, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in KERNELS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _replay(calls: list[Call]) -> None:
    # The calls were recorded below autograd: replayed without it they are the kernels alone.
    with torch.no_grad():
        for func, args, kwargs in calls:
            func(*args, **kwargs)


def masks_at_rounds(model, x, rounds: list[int], total: int, density: float) -> dict[int, dict]:
    """The masks that round r of the prune scores with (those after round r - 1; all ones
    for round 1), for each r in ``rounds``."""
    steps = prune_rounds(model, x, density=density, rounds=total)
    found = {1: None} if 1 in rounds else {}
    with contextlib.closing(steps):
        for step in steps:
            if step.index + 1 in rounds:
                found[step.index + 1] = step.masks
            if step.index + 1 >= max(rounds):
                break
    return found


def round_row(model, x, round_index: int, masks, repeats: int) -> dict:
    """One round's scoring time, its kernel calls replayed, and the rest."""
    def score():
        px_scores(model, x, masks=masks)

    scoring = median_seconds(score, warmup=2, repeats=repeats)
    with _KernelCalls() as recorder:
        score()
    kernels = median_seconds(lambda: _replay(recorder.calls), warmup=1, repeats=repeats)
    rest = scoring - kernels
    return {"round": round_index, "kernel_calls": len(recorder.calls), "scoring_ms": scoring * 1e3,
            "kernels_ms": kernels * 1e3, "rest_ms": rest * 1e3, "rest_share": rest / scoring}


COLUMNS = (("round", "round", "d"), ("kernel_calls", "kernel calls", "d"), ("scoring_ms", "scoring ms", ".1f"),
           ("kernels_ms", "kernels replayed ms", ".1f"), ("rest_ms", "rest ms", ".1f"),
           ("rest_share", "rest share", ".2f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 32, a 5-round prune, rounds 1 3 5")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10, 25, 50, 75, 100],
                        help="the prune rounds to measure (1-based)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="save a bar chart of kernels and rest per round to this PNG file")
    args = parser.parse_args()
    total, batch, rounds = (5, 32, [1, 3, 5]) if args.quick else (100, 128, sorted(set(args.rounds)))
    if min(rounds) < 1 or max(rounds) > total:
        raise SystemExit(f"--rounds must lie in 1..{total}")
    torch.manual_seed(0)
    model, x = cifar_resnet(20), torch.randn(batch, 3, 32, 32)
    rows = []
    with reused_cpu_memory(), plans_reused():
        start = time.perf_counter()
        masks = masks_at_rounds(model, x, rounds, total, 0.018)
        print(f"masks of rounds {rounds} from a {total}-round prune in {time.perf_counter() - start:.1f} s")
        for r in rounds:
            rows.append(round_row(model, x, r, masks[r], args.repeats))
            print_table(rows[-1:], COLUMNS)
    print(f"\nResNet-20, B={batch}: a scoring against its kernel calls replayed back to back")
    print_table(rows, COLUMNS)
    write_json(args.json, "round_overhead", {"quick": args.quick, "batch": batch, "prune_rounds": total,
                                            "repeats": args.repeats}, rows)
    plot_bars(args.plot, f"PX scoring of ResNet-20 (B={batch}) at rounds of its prune",
              [f"round {r['round']}" for r in rows],
              {"kernels replayed": [r["kernels_ms"] for r in rows], "the rest": [r["rest_ms"] for r in rows]},
              "ms per scoring")


if __name__ == "__main__":
    main()
