"""pxkern: fast PX (Path eXclusion) pruning-at-initialization scores for PyTorch."""

from pxkern.pruning import prune
from pxkern.px.scores import px_scores
from pxkern.sparse import sparsify

__all__ = ["prune", "px_scores", "sparsify"]
