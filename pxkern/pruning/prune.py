"""Iterative pruning at initialization (spec section 4) with any criterion."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from pxkern.memory import reused_cpu_memory
from pxkern.px.fused import plans_reused
from pxkern.pruning.blocks import block_mean_scores, check_block
from pxkern.pruning.criteria import checked_criterion, score
from pxkern.pruning.masks import apply_masks
from pxkern.pruning.schedule import exponential_densities
from pxkern.pruning.threshold import check_scope, kept_masks
from pxkern.weights import prunable_weights, resolve_masks

# Profiler ranges of a round (``torch.profiler``): scoring, then selecting and combining
# the masks.
ROUND_LABELS = {"score": "pxkern::prune_score", "select": "pxkern::prune_select"}


def _target_density(density: float | None, sparsity: float | None) -> float:
    if (density is None) == (sparsity is None):
        raise ValueError("pass exactly one of density (fraction kept) and sparsity (fraction removed)")
    name, value = ("density", density) if density is not None else ("sparsity", sparsity)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    target = float(value) if density is not None else 1.0 - float(value)
    if not 0.0 < target <= 1.0:  # also rejects NaN
        allowed = "(0, 1]" if density is not None else "[0, 1)"
        raise ValueError(f"{name} must be in {allowed}, got {value}")
    return target


def _reusable(data: Any) -> Any:
    """Every round iterates ``data`` again: a one-shot iterator is read into a list once."""
    if data is None:
        raise ValueError("data is None: pass a batch or an iterable of batches / (x, y) pairs")
    if isinstance(data, Iterable) and iter(data) is data:
        return list(data)
    return data


@dataclass(frozen=True)
class PruneRound:
    """One finished round of :func:`prune_rounds`."""

    index: int  # 1-based
    density: float  # the round's target: the fraction of prunable weights to keep
    masks: dict[str, torch.Tensor]  # bool, keyed by weight name: the masks after the round
    kept: int  # how many weights the masks keep (ties at the threshold may keep fewer)
    total: int  # how many prunable weights there are


def prune_rounds(
    model: nn.Module,
    data: Any,
    *,
    density: float | None = None,
    sparsity: float | None = None,
    rounds: int = 100,
    scope: str = "global",
    method: str = "px",
    generator: torch.Generator | None = None,
    block: tuple[int, int] | None = None,
    **criterion_kwargs: Any,
) -> Iterator[PruneRound]:
    """The rounds of :func:`prune` one at a time, without changing the model: each round
    scores under the masks so far, keeps its top fraction, and yields a
    :class:`PruneRound`. Stopping early (``break``) ends the schedule there; close the
    iterator (``contextlib.closing``) to release its pooled memory at once. The arguments
    are :func:`prune`'s, which is this loop plus a progress bar and the final masks put on
    the model.
    """
    densities = exponential_densities(_target_density(density, sparsity), rounds)
    check_scope(scope)
    checked_criterion(method, criterion_kwargs)  # fail before any work
    if block is not None:
        check_block(block)
    weights = prunable_weights(model)
    masks = {name: mask != 0 for name, mask in resolve_masks(weights, None).items()}
    total = sum(w.param.numel() for w in weights)
    score_under = functools.partial(score, method, model, _reusable(data), generator=generator, **criterion_kwargs)
    # A generator function would check none of the above until iterated.
    return _rounds(score_under, scope, block, densities, masks, total)


def _rounds(score_under: Callable[[dict], dict], scope: str, block: tuple[int, int] | None,
            densities: list[float], masks: dict[str, torch.Tensor], total: int) -> Iterator[PruneRound]:
    # Every round allocates the same temporaries: keep their blocks from round to round;
    # and the model does not change between rounds: trace it for the fused plan once.
    with reused_cpu_memory(), plans_reused():
        for index, round_density in enumerate(densities, start=1):
            with record_function(ROUND_LABELS["score"]):
                scores = score_under(masks)
            with record_function(ROUND_LABELS["select"]):
                if block is not None:
                    scores = block_mean_scores(scores, block)
                masks, kept = kept_masks(scores, round_density, scope=scope, keep_ties=block is not None,
                                         masks=masks)
            yield PruneRound(index, round_density, masks, kept, total)


def prune(
    model: nn.Module,
    data: Any,
    *,
    density: float | None = None,
    sparsity: float | None = None,
    rounds: int = 100,
    scope: str = "global",
    method: str = "px",
    generator: torch.Generator | None = None,
    progress: bool = True,
    block: tuple[int, int] | None = None,
    **criterion_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place to ``density`` (or ``1 - sparsity``) of its prunable weights.

    Round ``r = 1..rounds`` scores the weights with ``method`` (a key of
    :data:`pxkern.pruning.CRITERIA`) under the current masks, then keeps the top
    ``density ** (r / rounds)`` fraction, of all weights together (``scope="global"``) or of
    each weight tensor (``scope="layer"``), by the rule of
    :mod:`pxkern.pruning.threshold`; weights pruned earlier stay pruned. Masks the model
    already carries are the starting point. :func:`prune_rounds` runs the same rounds one
    at a time.

    With ``block=(bm, bn)`` whole blocks of each weight's ``[C_out, C_in*kh*kw]`` matrix
    are kept or pruned, ranked by their mean score (:mod:`pxkern.pruning.blocks`). The
    block that holds the threshold is kept, so the density may exceed the target by about
    a block, and with ``scope="layer"`` every layer with a positive score keeps a block.

    ``data`` is a batch or an iterable of batches / ``(x, y)`` pairs (SNIP and GraSP need
    the labels), read anew every round. ``generator`` seeds ``method="random"``;
    ``criterion_kwargs`` go to the criterion (e.g. ``bn``). One-shot methods (magnitude,
    random, snip, grasp in the official code) are meant for ``rounds=1``.

    The masks are put on the model with ``torch.nn.utils.prune`` after the last round
    (criteria take the masks explicitly, so the rounds need no model changes). Returns the
    final bool masks keyed by weight name (e.g. ``"layer1.0.conv1.weight"``).
    """
    steps = prune_rounds(model, data, density=density, sparsity=sparsity, rounds=rounds, scope=scope,
                         method=method, generator=generator, block=block, **criterion_kwargs)
    bar = tqdm(total=rounds, desc=f"pruning ({method}, {scope})", unit="round", disable=not progress)
    with contextlib.closing(steps), bar:
        for step in steps:
            # The postfix first: update() redraws the bar, which then shows this round's density.
            bar.set_postfix(density=f"{step.kept / step.total:.4f}", refresh=False)
            bar.update()
    apply_masks(model, step.masks)
    return step.masks
