"""What every benchmark shares: timing, machine description, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def median_seconds(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
                      warm_calls: int = 0) -> dict[str, list[float]]:
    """Wall times of each function over ``repeats`` rounds, the functions run in turn within
    every round: on a shared machine whose speed drifts, each ratio then compares like
    with like.

    ``warm_calls=0``: each turn times one call, made right after the other functions'
    calls, so its operands come from memory (cold caches). ``warm_calls=n``: each turn
    makes one untimed call, then times ``n`` more and takes their mean: the operands are
    in cache, as for a layer whose input the previous layer has just written (the
    convention of ``torch.utils.benchmark`` and pytest-benchmark, which time calls back
    to back)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if warm_calls:
                fn()
            calls = max(warm_calls, 1)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
                        warm_calls: int = 0) -> dict[str, float]:
    """Median wall time of each function, timed as by ``interleaved_times``."""
    times = interleaved_times(fns, warmup, repeats, warm_calls)
    return {name: statistics.median(values) for name, values in times.items()}


def prepare_kernel_benchmark(threads: int | None) -> None:
    """Use ``threads`` intra-op threads if given; stop with the build command when the
    C++ extension the kernel benchmarks measure is not built."""
    from pxkern._extension import EXTENSION_AVAILABLE

    if threads is not None:
        torch.set_num_threads(threads)
    if not EXTENSION_AVAILABLE:
        raise SystemExit("pxkern extension not built: run `pip install --no-build-isolation -e .`")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """The facts a reader needs to compare two result files."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` given as (key, header, format spec)."""
    cells = [[format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns]
             for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def write_json(path: str | None, benchmark: str, config: dict, rows: Sequence[dict],
               summary: dict | None = None) -> None:
    """``rows`` (and a ``summary`` of the whole run, if any) with the machine and config."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "machine": machine(), "config": config, "rows": list(rows)}
    if summary is not None:
        payload["summary"] = summary
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def plot_bars(path: str | None, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], ylabel: str) -> None:
    """A grouped bar chart, one group per label and one bar per series, saved to ``path``."""
    if not path:
        return
    plt = pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3, 4))
    for index, (name, values) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.25)  # room above the tallest bar for its label and the legend
    ax.legend(loc="upper left", ncols=len(series))
    save_figure(plt, fig, path)


def plot_stacked(path: str | None, title: str, x: Sequence[float], series: dict[str, Sequence[float]],
                 xlabel: str, ylabel: str) -> None:
    """Stacked areas of ``series`` over ``x`` (parts of a whole that changes along x), saved
    to ``path``."""
    if not path:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(x, *series.values(), labels=list(series))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(x=0)
    ax.legend(loc="upper right")
    save_figure(plt, fig, path)


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str) -> None:
    """Lay out ``fig``, save it to ``path`` as PNG and close it."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
