"""Pruning at initialization: scoring criteria, schedules, masks and the pruning loop."""

from pxkern.pruning.criteria import CRITERIA, score
from pxkern.pruning.prune import prune

__all__ = ["CRITERIA", "prune", "score"]
