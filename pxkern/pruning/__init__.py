"""Pruning at initialization: scoring criteria, schedules, masks and the pruning loop."""

from pxkern.pruning.criteria import CRITERIA, score
from pxkern.pruning.prune import PruneRound, prune, prune_rounds

__all__ = ["CRITERIA", "PruneRound", "prune", "prune_rounds", "score"]
