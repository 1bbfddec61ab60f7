"""Choosing between two exact implementations of one computation by timing both.

Which of two kernels is faster on this CPU depends on shapes, layout, sparsity and the
machine, so no fixed rule holds (``sparse_conv2d`` against ATen's convolution; in
``px_conv2d``'s CPU backward, the input gradient as a convolution against ATen's). The
first call of a configuration times both on the real inputs and remembers the faster;
later calls only look it up.

The configurations of one shape differ in a level (the weight's density, in tenths) on
which the first implementation's time does not depend and the second's does not fall:
ATen's dense convolution against kernels that skip zeros. So a level above one where the
second lost (or below one where it won) is decided without timing. A process's first
100-round prune of ResNet-20 spent 0.62 s timing kernels when every level was timed,
0.38 s now. Both are timed at each level that is timed, in the same moment: the machine's
speed swings by up to 1.5x between phases, and a time remembered from another phase
could decide the level, and every level it implies, wrongly (timing the first once per
shape saved another 0.16 s).
"""

import time
from collections.abc import Callable, Hashable

import torch

__all__ = ["density_level", "known_choice", "second_is_faster"]

# key -> {level: whether the second was faster}
_CHOICES: dict[Hashable, dict[int, bool]] = {}


def second_is_faster(key: Hashable, first: Callable[[], object], second: Callable[[], object],
                     level: int = 0) -> bool:
    """Whether ``second()`` runs faster than ``first()`` (best of two runs each, without
    autograd) at ``level`` of the configuration ``key``; both must compute the same thing.
    ``key`` must describe everything the timing depends on (threads included) except the
    level; ``first``'s time must not depend on the level and ``second``'s must not fall
    as it rises."""
    choices = _CHOICES.setdefault(key, {})
    if level not in choices:
        choice = _implied(choices, level)
        if choice is None:
            choice = _best_of_two(second) < _best_of_two(first)
        choices[level] = choice
    return choices[level]


def density_level(density: float) -> int:
    """The level of a weight density, in tenths: the callers' second kernels skip zeros,
    so their time grows with it while the first's (a dense kernel) does not."""
    return round(density * 10)


def known_choice(key: Hashable, level: int = 0) -> bool | None:
    """What :func:`second_is_faster` answers at ``level`` of ``key`` without timing (its
    measurement there, or what the measured levels imply), or None if it would time. The
    compiled program of the fused plan (``pxkern.px.program``) looks its kernels up here
    and measures what is not known yet."""
    choices = _CHOICES.get(key, {})
    return choices[level] if level in choices else _implied(choices, level)


def _implied(choices: dict[int, bool], level: int) -> bool | None:
    """The choice at ``level`` that the known ones imply, or None: the second loses above
    a level where it lost and wins below one where it won."""
    if any(not won and known <= level for known, won in choices.items()):
        return False
    if any(won and known >= level for known, won in choices.items()):
        return True
    return None


def _best_of_two(run: Callable[[], object]) -> float:
    times = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return min(times)
