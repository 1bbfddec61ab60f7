"""Choosing between two exact implementations of one computation by timing both.

Which of two kernels is faster on this CPU depends on shapes, layout, sparsity and the
machine, so no fixed rule holds (``sparse_conv2d`` against ATen's convolution; in
``px_conv2d``'s CPU backward, the input gradient as a convolution against ATen's). The
first call of a configuration runs both twice on the real inputs and remembers the
faster; later calls only look it up.
"""

import time
from collections.abc import Callable, Hashable

import torch

__all__ = ["second_is_faster"]

_CHOICES: dict[Hashable, bool] = {}


def second_is_faster(key: Hashable, first: Callable[[], object], second: Callable[[], object]) -> bool:
    """Whether ``second()`` ran faster than ``first()`` (best of two runs each, without
    autograd) when the configuration ``key`` was first seen; both must compute the same
    thing. ``key`` must describe everything the timing depends on, threads included."""
    if key not in _CHOICES:
        _CHOICES[key] = _best_of_two(second) < _best_of_two(first)
    return _CHOICES[key]


def _best_of_two(run: Callable[[], object]) -> float:
    times = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return min(times)
