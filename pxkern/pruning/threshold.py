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

from typing import Mapping

import torch

from pxkern.ops.keep_top import first_nan_index, keep_top, threshold_of


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


def _nan_error(name: str) -> ValueError:
    return ValueError(f"scores[{name!r}] contains NaN")


def global_threshold(scores: Mapping[str, torch.Tensor], density: float) -> float:
    """Threshold of the global rule over all entries of ``scores`` (a dict of any-shape
    floating tensors): keep ``score > global_threshold(scores, density)``."""
    density = _check_density(density)
    _check_scores(scores)
    nan_index = first_nan_index(list(scores.values()))
    if nan_index >= 0:
        raise _nan_error(list(scores)[nan_index])
    return threshold_of(torch.cat([s.detach().reshape(-1) for s in scores.values()]), density)


SCOPES = ("global", "layer")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")


def kept_masks(scores: Mapping[str, torch.Tensor], density: float, *, scope: str = "global",
               keep_ties: bool = False,
               masks: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Bool masks (same keys and shapes as ``scores``) keeping the top ``density`` fraction
    of all entries together (``scope="global"``) or of each tensor (``"layer"``), and with
    ``masks`` (bool, keyed like ``scores``) only the entries those keep; and how many
    entries the result keeps. One call of :func:`pxkern.ops.keep_top.keep_top`."""
    density = _check_density(density)
    _check_scores(scores)
    check_scope(scope)
    names = list(scores)
    kept, count, nan_index = keep_top(
        [scores[name].detach() for name in names], density, per_tensor=scope == "layer", keep_ties=keep_ties,
        masks=None if masks is None else [masks[name] for name in names],
    )
    if nan_index >= 0:
        raise _nan_error(names[nan_index])
    return dict(zip(names, kept)), count


def global_keep_masks(scores: Mapping[str, torch.Tensor], density: float, *,
                      keep_ties: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks (same keys and shapes as ``scores``) keeping the top ``density``
    fraction of all entries of all tensors together."""
    return kept_masks(scores, density, keep_ties=keep_ties)[0]


def layer_keep_masks(scores: Mapping[str, torch.Tensor], density: float, *,
                     keep_ties: bool = False) -> dict[str, torch.Tensor]:
    """Bool masks keeping the top ``density`` fraction of each tensor separately
    (the layer-wise scope), with the same rule as :func:`global_keep_masks`."""
    return kept_masks(scores, density, scope="layer", keep_ties=keep_ties)[0]
