"""How much of a PX prune round is not kernels: each chosen round's scoring on the Python
plan against its dispatcher calls replayed from C++, and on the plan's compiled program.

The 100-round PX prune of ResNet-20 (B=128, density 0.018) runs its rounds as
``pxkern.prune`` does (``prune_rounds``: plans reused, memory reused), keeping the masks
each chosen round scores with. At each of them it times the raw scores of the fused plan
on the Python plan (``FusedPlan.raw_scores``) and on its program (``pxkern::plan_scores``,
one C++ call; ``pxkern.px.program``), interleaved, median of ``--repeats``; records every
dispatcher call of one Python-plan scoring with its arguments, and replays them back to
back from C++ (``benchmarks/call_replay.cpp``, compiled on first use by
``torch.utils.cpp_extension``): all of them, and the kernels alone (A's, B's and C's
convolutions, the gates, C's convolution backward: ``KERNELS``). The split:

- kernels: the kernel calls replayed;
- small ops: all calls replayed, less the kernels (weight preparation, reductions, casts,
  the residual sums of C, the scores' products);
- Python: the Python plan's scoring, less all calls replayed;
- program - all calls: what the program spends beyond the same calls replayed (its
  Python around the one call, and the calls' dispatch from C++); the Python it removed
  is the difference to the Python column.

A replayed call reads the tensors recorded in the scoring (nothing flows between the
calls), so each kernel does the same work (shapes, weights, densities), and in-place ops
rewrite their recorded operands at every repeat. Its inputs were not just written by the
call before it, as in a live scoring, so they are less often in cache: if anything the
replay overstates the calls and understates the Python.

Usage: python -m benchmarks.bench_round_overhead [--quick] [--rounds 1 10 25 50 75 100]
       [--json results/round_overhead.json] [--plot results/round_overhead.png]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.cpp_extension import load

from benchmarks.common import interleaved_medians, plot_stacked, print_table, write_json
from pxkern.memory import reused_cpu_memory
from pxkern.models import cifar_resnet
from pxkern.pruning import prune_rounds
from pxkern.px.fused import cached_plan, plans_reused
from pxkern.px.program import plan_raw_scores
from pxkern.px.scaled import stream_layout
from pxkern.weights import last_linear_name, prunable_weights, resolve_masks

# Dispatcher names (without overload) of the calls an exact evaluation of the streams
# cannot skip: every convolution goes through aten::convolution, whichever kernel
# (oneDNN, ATen's float64 path) runs below it.
KERNELS = frozenset({"convolution", "sparse_conv2d", "gate_streams", "convolution_backward"})
# Calls a replay leaves out: the memory pool's switch and the profiler's ranges.
NOT_REPLAYED = frozenset({"reuse_cpu_memory", "_record_function_enter_new", "_record_function_exit"})

# (operator name, overload name, args, kwargs, kernel?)
Call = tuple[str, str, tuple, dict, bool]


class _Calls(TorchDispatchMode):
    """Records the calls made under it, with their arguments, for call_replay.cpp."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name not in NOT_REPLAYED:
            overload = "" if func._overloadname == "default" else func._overloadname
            self.calls.append((func._schema.name, overload, _boxable(func, args), kwargs, name in KERNELS))
        return func(*args, **kwargs)


def _boxable(func, args: tuple) -> tuple:
    """``args`` with Python numbers passed for Tensor arguments (the wrapped scalars of
    ``tensor * 0.5``) as 0-d tensors, the form the boxed call takes."""
    return tuple(
        torch.tensor(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
        and str(argument.type) == "Tensor" else value
        for value, argument in zip(args, func._schema.arguments)
    )


@functools.cache
def _call_replay():
    return load("pxkern_call_replay", [str(Path(__file__).with_name("call_replay.cpp"))],
                extra_cflags=["-O2"])


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
    """One round's scoring on the Python plan and on its program, the Python plan's calls
    replayed from C++ (all; the kernels), and the split into kernels, small ops and
    Python; the program's own overhead is its time less all the calls replayed."""
    weights = prunable_weights(model)
    plan = cached_plan(model, weights, {last_linear_name(model)}, "cpp")
    masks = resolve_masks(weights, masks)
    batch = x.contiguous(memory_format=stream_layout(x))

    def python_plan():
        plan.raw_scores([batch], masks, weights)

    def program():
        plan_raw_scores(plan, [batch], masks, weights)

    times = interleaved_medians({"plan": python_plan, "program": program}, warmup=2, repeats=repeats)
    with _Calls() as recorder:
        python_plan()
    replay = _call_replay()
    every_call = replay.prepare([call[:4] for call in recorder.calls])
    kernel_calls = replay.prepare([call[:4] for call in recorder.calls if call[4]])
    replayed = {}
    # The calls were recorded below autograd: replayed without it, as they ran.
    with torch.no_grad():
        for name, calls in (("all", every_call), ("kernels", kernel_calls)):
            replay.run(calls)  # warm-up
            replayed[name] = statistics.median(replay.run(calls) for _ in range(repeats))
    scoring = times["plan"]
    return {
        "round": round_index, "calls": len(recorder.calls), "kernel_calls": sum(call[4] for call in recorder.calls),
        "scoring_ms": scoring * 1e3, "program_ms": times["program"] * 1e3, "all_calls_ms": replayed["all"] * 1e3,
        "kernels_ms": replayed["kernels"] * 1e3, "small_ops_ms": (replayed["all"] - replayed["kernels"]) * 1e3,
        "python_ms": (scoring - replayed["all"]) * 1e3, "python_share": (scoring - replayed["all"]) / scoring,
        "program_overhead_ms": (times["program"] - replayed["all"]) * 1e3,
    }


COLUMNS = (("round", "round", "d"), ("calls", "calls", "d"), ("kernel_calls", "kernel calls", "d"),
           ("scoring_ms", "Python plan ms", ".1f"), ("all_calls_ms", "all calls from C++ ms", ".1f"),
           ("kernels_ms", "kernels from C++ ms", ".1f"), ("small_ops_ms", "small ops ms", ".1f"),
           ("python_ms", "Python ms", ".1f"), ("python_share", "Python share", ".2f"),
           ("program_ms", "program ms", ".1f"), ("program_overhead_ms", "program - all calls ms", ".1f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 32, a 5-round prune, rounds 1 3 5")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10, 25, 50, 75, 100],
                        help="the prune rounds to measure (1-based)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="save the split per round as stacked areas to this PNG file")
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
    print(f"\nResNet-20, B={batch}: a scoring on the Python plan against its calls replayed back to back "
          f"from C++, and on the plan's program")
    print_table(rows, COLUMNS)
    write_json(args.json, "round_overhead", {"quick": args.quick, "batch": batch, "prune_rounds": total,
                                            "repeats": args.repeats}, rows)
    plot_stacked(args.plot, f"PX scoring of ResNet-20 (B={batch}) at rounds of its prune",
                 [r["round"] for r in rows],
                 {"kernels": [r["kernels_ms"] for r in rows], "small ops": [r["small_ops_ms"] for r in rows],
                  "Python": [r["python_ms"] for r in rows]},
                 "prune round", "ms per scoring")


if __name__ == "__main__":
    main()
