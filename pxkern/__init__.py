"""pxkern: fast PX (Path eXclusion) pruning-at-initialization scores for PyTorch."""

from pxkern.px.scores import px_scores

__all__ = ["px_scores"]
