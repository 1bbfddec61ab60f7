"""Density schedules of iterative pruning (spec section 4)."""

from __future__ import annotations


def exponential_densities(density: float, rounds: int) -> list[float]:
    """The paper's schedule: ``[density ** (r / rounds) for r in 1..rounds]``.

    ``density`` is the final fraction of weights kept, in (0, 1]; ``rounds >= 1``. Each
    round removes the same fraction of the weights still alive, and the last entry is
    exactly ``density``.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not 0.0 < density <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    if isinstance(rounds, bool) or not isinstance(rounds, int):
        raise TypeError(f"rounds must be an int >= 1, got {type(rounds).__name__}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [float(density) ** (r / rounds) for r in range(1, rounds + 1)]
