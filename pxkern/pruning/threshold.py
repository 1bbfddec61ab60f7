"""Keep masks from scores: the top-k thresholding rule of PX pruning (spec section 4).

With ``N`` scored weights and density ``d`` (the fraction to keep), ``k = int((1 - d) * N)``,
the threshold is the k-th smallest score and the kept weights are those with
``score > threshold``. Ties at the threshold are all pruned, so fewer than ``d * N``
weights may survive; weights that already score 0 stay pruned whenever the threshold
is 0. With ``k = 0`` (density 1, or too few weights to drop one) every weight is kept.

``keep_ties=True`` keeps the ties at a positive threshold instead. Block pruning uses it:
there every weight of a block shares the block's score, so the rule above would drop the
whole block that holds the k-th smallest weight, and a layer of few blocks pruned on its
own (four 32x32 blocks at density 0.1) would lose all of them.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    density = float(density)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict of name -> tensor")
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"scores[{name!r}] is a {type(score).__name__}: expected a tensor")
        if not score.is_floating_point():
            raise TypeError(f"scores[{name!r}] has dtype {score.dtype}: expected a floating-point tensor")
        if score.numel() == 0:
            raise ValueError(f"scores[{name!r}] is empty")
        if bool(torch.isnan(score).any()):
            raise ValueError(f"scores[{name!r}] contains NaN")


# Below this fraction of non-positive scores, _threshold selects over all of them.
_SPLIT_FRACTION = 0.3


def _threshold(flat: torch.Tensor, density: float) -> float:
    """The k-th smallest entry of ``flat`` (1-based, ``k = int((1 - density) * numel)``),
    or ``-inf`` when ``k == 0`` (keep everything)."""
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


def global_threshold(scores: Mapping[str, torch.Tensor], density: float) -> float:
    """Threshold of the global rule over all entries of ``scores`` (a dict of any-shape
    floating tensors): keep ``score > global_threshold(scores, density)``."""
    density = _check_density(density)
    _check_scores(scores)
    flat = torch.cat([s.detach().reshape(-1) for s in scores.values()])
    return _threshold(flat, density)


def _above(score: torch.Tensor, threshold: float, keep_ties: bool) -> torch.Tensor:
    score = score.detach()
    kept = score > threshold
    return kept | (score == threshold) if keep_ties and threshold > 0 else kept


def global_keep_masks(scores: Mapping[str, torch.Tensor], density: float, *,
                      keep_ties: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks (same keys and shapes as ``scores``) keeping the top ``density``
    fraction of all entries of all tensors together."""
    threshold = global_threshold(scores, density)
    return {name: _above(s, threshold, keep_ties) for name, s in scores.items()}


def layer_keep_masks(scores: Mapping[str, torch.Tensor], density: float, *,
                     keep_ties: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks keeping the top ``density`` fraction of each tensor separately
    (the layer-wise scope), with the same rule as :func:`global_keep_masks`."""
    density = _check_density(density)
    _check_scores(scores)
    return {
        name: _above(s, _threshold(s.detach().reshape(-1), density), keep_ties) for name, s in scores.items()
    }
