"""Keep masks of the top-k rule in one call: ``pxkern::keep_top``.

A pruning round's selection (:mod:`pxkern.pruning.threshold` states the rule): the k-th
smallest score is the threshold, the entries above it are kept, and so are only those
that old masks kept; plus how many that is. As PyTorch ops that is a NaN check, a
concatenation, a ``kthvalue`` and three ops per tensor: 1.2-3.3 ms a round on ResNet-20's
270k scores. The C++ kernel reads the scores three or four times in one call (a radix
select, then the masks): 0.6-1.1 ms.

Backends (:func:`pxkern.backend.choose_backend`): ``"cpp"`` for CPU tensors of one dtype,
float32 or float64, when the extension is built; ``"torch"`` otherwise. No gradient.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import choose_backend

__all__ = ["first_nan_index", "keep_top", "threshold_of"]

_CPP_DTYPES = (torch.float32, torch.float64)

# Below this fraction of non-positive scores, threshold_of selects over all of them.
_SPLIT_FRACTION = 0.3


def threshold_of(flat: Tensor, density: float) -> float:
    """The k-th smallest entry of ``flat`` (1-based, ``k = int((1 - density) * numel)``),
    or ``-inf`` when ``k == 0`` (keep everything); PyTorch ops."""
    k = int((1.0 - density) * flat.numel())
    if k == 0:
        return -math.inf
    # In later pruning rounds most scores are 0 (the weights pruned so far): the k-th
    # smallest is then found among the positive scores or the rest alone, which is up to
    # 4x faster than kthvalue over all (measured on 14M scores, 95% zero); with few
    # non-positive scores the selection pass would cost more than it saves.
    positive = flat > 0
    rest = flat.numel() - int(positive.count_nonzero())
    if rest < _SPLIT_FRACTION * flat.numel():
        return flat.kthvalue(k).values.item()
    if k <= rest:
        return flat[~positive].kthvalue(k).values.item()
    return flat[positive].kthvalue(k - rest).values.item()


def first_nan_index(scores: Sequence[Tensor]) -> int:
    """Index of the first tensor of ``scores`` holding a NaN, or -1; PyTorch ops."""
    return next((index for index, score in enumerate(scores) if bool(torch.isnan(score).any())), -1)


def _above(score: Tensor, threshold: float, keep_ties: bool) -> Tensor:
    kept = score > threshold
    return kept | (score == threshold) if keep_ties and threshold > 0 else kept


def _runs_on_cpp(scores: Sequence[Tensor], masks: Sequence[Tensor] | None) -> bool:
    dtype = scores[0].dtype
    return (
        choose_backend("keep_top", scores[0].device, implemented=("cpp", "torch")) == "cpp"
        and dtype in _CPP_DTYPES
        and all(s.device.type == "cpu" and s.dtype == dtype for s in scores)
        and (masks is None or all(m.device.type == "cpu" and m.dtype == torch.bool for m in masks))
    )


def keep_top(scores: Sequence[Tensor], density: float, *, per_tensor: bool = False, keep_ties: bool = False,
             masks: Sequence[Tensor] | None = None) -> tuple[list[Tensor], int, int]:
    """``(kept, count, nan_index)``: bool masks shaped like ``scores`` keeping the top
    ``density`` fraction of all their entries together (of each tensor with
    ``per_tensor``) by the rule of :mod:`pxkern.pruning.threshold`, and where ``masks``
    (bool, shaped like ``scores``) are given only entries they keep; ``count`` kept
    entries. If a score tensor holds a NaN: ``([], 0, its index)``, for the caller to name;
    else ``nan_index`` is -1. ``scores`` are floating tensors, ``0 < density <= 1``
    (the caller checks both)."""
    if masks is not None and (len(masks) != len(scores) or any(m.shape != s.shape for m, s in zip(masks, scores))):
        raise ValueError("keep_top: masks must be one per score tensor, shaped like it")
    if _runs_on_cpp(scores, masks):
        kept, counts = torch.ops.pxkern.keep_top(list(scores), [] if masks is None else list(masks), density,
                                                 per_tensor, keep_ties)
        count, nan_index = counts.tolist()
        return kept, count, nan_index
    nan_index = first_nan_index(scores)
    if nan_index >= 0:
        return [], 0, nan_index
    if per_tensor:
        kept = [_above(s, threshold_of(s.reshape(-1), density), keep_ties) for s in scores]
    else:
        threshold = threshold_of(torch.cat([s.reshape(-1) for s in scores]), density)
        kept = [_above(s, threshold, keep_ties) for s in scores]
    if masks is not None:
        kept = [k & m for k, m in zip(kept, masks)]
    return kept, sum(int(k.count_nonzero()) for k in kept), -1


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::keep_top")
    def _keep_top_fake(scores: list[Tensor], masks: list[Tensor], density: float, per_tensor: bool,
                       keep_ties: bool) -> tuple[list[Tensor], Tensor]:
        # Without a NaN (the only case a trace can take), one mask per score tensor.
        return [s.new_empty(s.shape, dtype=torch.bool) for s in scores], scores[0].new_empty(2, dtype=torch.int64)
