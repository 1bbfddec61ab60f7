"""Pruning-at-initialization criteria behind one interface.

Every criterion is a function ``(model, data, masks, **options) -> scores``:

- ``model``: the network, left exactly as it was found (parameters, buffers, train/eval
  mode, hooks, ``.grad``). Criteria evaluate it through :func:`torch.func.functional_call`
  with the masked weights ``W * M`` substituted, and switch module modes only inside a
  ``try/finally`` that restores them.
- ``data``: a batch or an iterable of batches / ``(x, y)`` pairs (SNIP and GraSP need the
  labels ``y``; magnitude and random ignore ``data``).
- ``masks``: 0/1 (or bool) masks keyed by weight name; missing ones come from the masks
  the model carries, else all ones (:func:`pxkern.weights.resolve_masks`).
- ``scores``: one float32 tensor per prunable weight, keyed by its name, same shape and
  device as the weight. Higher means "keep". Masked entries score 0 (the lowest possible
  value of the non-negative criteria), except GraSP, whose scores are signed and whose
  masked entries are ``-inf``: under the rule "keep ``score > threshold``" they are never
  selected again.

The scores follow the authors' implementation (iurada/px-ntk-pruning, ``lib/pruners.py``),
including its normalizations (a positive constant, which changes no ranking).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pxkern.data import iter_batches
from pxkern.evaluation import batchnorm_buffer_copies, evaluation_mode, model_state_restored, unit_prune_masks
from pxkern.weights import PrunableWeight, prunable_weights, resolve_masks

Scores = dict[str, torch.Tensor]
Masks = Mapping[str, torch.Tensor] | None
Criterion = Callable[..., Scores]

# GraSP divides the logits by this temperature (GraSP paper and the official code).
GRASP_TEMPERATURE = 200.0
# Keeps GraSP's normalization finite when the scores sum to zero (official value).
GRASP_EPS = 1e-10


# ---------------------------------------------------------------------------------------
# Evaluating the model without touching it


def _call(
    model: nn.Module,
    weights: list[PrunableWeight],
    effective: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    others: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``model(x)`` with every prunable weight replaced by ``effective[name]`` (already
    masked) and any other parameter/buffer by ``others[key]`` (keys of ``named_parameters``
    / ``named_buffers``)."""
    substitutes = {**unit_prune_masks(weights, next(iter(effective.values())).dtype), **(others or {})}
    for w in weights:
        substitutes[w.param_name] = effective[w.name]
    with model_state_restored(model):
        return functional_call(model, substitutes, (x,))


def _labelled_batches(
    method: str, data: Any, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(x, y)`` batches of ``data``, validated; ``method`` names the caller in errors."""
    items = [data] if isinstance(data, torch.Tensor) else list(data)
    if not items:
        raise ValueError(f"data is empty: {method} needs at least one (x, y) batch")
    pairs = []
    for index, (x, item) in enumerate(zip(iter_batches(items, device), items)):
        y = item[1] if isinstance(item, (tuple, list)) and len(item) >= 2 else None
        if not isinstance(y, torch.Tensor):
            raise ValueError(
                f"{method} needs labels: data item {index} is not an (x, y) pair with a label tensor y"
            )
        if y.shape[:1] != x.shape[:1] or y.device != device:
            raise ValueError(
                f"labels of data item {index} have shape {tuple(y.shape)} on {y.device}: expected "
                f"{x.shape[0]} labels on {device}"
            )
        pairs.append((x, y))
    return pairs


def _setup(model: nn.Module, masks: Masks) -> tuple[list[PrunableWeight], dict[str, torch.Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weights = prunable_weights(model)
    return weights, resolve_masks(weights, masks)


def _finish(
    weights: list[PrunableWeight],
    raw: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    masked_value: float = 0.0,
) -> Scores:
    """float32 scores with masked entries set to ``masked_value``."""
    return {
        w.name: raw[w.name].detach().to(torch.float32).masked_fill(masks[w.name] == 0, masked_value)
        for w in weights
    }


# ---------------------------------------------------------------------------------------
# The criteria


def px(model: nn.Module, data: Any, masks: Masks = None, *, bn: str = "eval",
       keep: Iterable[str] | None = None, dtype: torch.dtype = torch.float32,
       backend: str | None = None) -> Scores:
    """PX scores (:func:`pxkern.px.scores.px_scores`, whose options these are)."""
    # Imported on use: the other criteria do not depend on the PX implementation, and
    # pxkern.px stays free to use pxkern.pruning without an import cycle.
    from pxkern.px.scores import px_scores

    return px_scores(model, data, masks=masks, bn=bn, keep=keep, dtype=dtype, backend=backend)


def magnitude(model: nn.Module, data: Any = None, masks: Masks = None) -> Scores:
    """``|W|`` (``data`` is ignored)."""
    weights, masks = _setup(model, masks)
    return _finish(weights, {w.name: w.param.abs() for w in weights}, masks)


def random(
    model: nn.Module, data: Any = None, masks: Masks = None, *, generator: torch.Generator | None = None
) -> Scores:
    """i.i.d. uniform scores in (0, 1] (``data`` is ignored).

    The official code draws ``randn``; any i.i.d. continuous law gives the same random
    ranking, and (0, 1] keeps unmasked entries strictly above the masked zeros. Drawn on
    the generator's device (CPU by default) in module order, so a seeded generator
    reproduces the same scores on any device.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    weights, masks = _setup(model, masks)
    device = generator.device if generator is not None else torch.device("cpu")
    raw = {
        w.name: (1.0 - torch.rand(w.shape, generator=generator, device=device)).to(w.param.device)
        for w in weights
    }
    return _finish(weights, raw, masks)


def snip(model: nn.Module, data: Any, masks: Masks = None, *, bn: str = "batch") -> Scores:
    """SNIP: ``|dL/dM| = |W * sum_b dL_b/d(W*M)|``, normalized to sum 1.

    ``L_b`` is the mean cross-entropy of batch ``b``; the absolute value is taken after
    summing over batches, as the official code accumulates gradients. ``bn="batch"`` (the
    official behaviour: it scores the freshly built model, in train mode) normalizes
    BatchNorm with batch statistics, ``"eval"`` with the running ones.
    """
    weights, masks = _setup(model, masks)
    batches = _labelled_batches("snip", data, weights[0].param.device)
    effective = {w.name: (w.param.detach() * masks[w.name]).requires_grad_() for w in weights}
    leaves = list(effective.values())
    grads = [torch.zeros_like(leaf) for leaf in leaves]
    with evaluation_mode(model, bn):
        for x, y in batches:
            loss = F.cross_entropy(_call(model, weights, effective, x, batchnorm_buffer_copies(model)), y)
            for total, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True)):
                if g is not None:
                    total += g
    raw = {w.name: (g * w.param.detach()).abs() for w, g in zip(weights, grads)}
    total = sum(r.sum() for r in raw.values())
    if total > 0:
        raw = {name: r / total for name, r in raw.items()}
    return _finish(weights, raw, masks)


def grasp(model: nn.Module, data: Any, masks: Masks = None, *, bn: str = "batch") -> Scores:
    """GraSP with the official sign convention: ``S = (H g) * W / (|sum S| + eps)``, keep
    the largest.

    ``g = sum_b dL_b/dW`` (stopped), ``H g = sum_b d(g . dL_b/dW)/dW``, with ``L_b`` the
    mean cross-entropy of the logits divided by the temperature 200 and the model
    evaluated with ``W * M``. Masked entries are ``-inf``. ``bn`` as for :func:`snip`.
    """
    weights, masks = _setup(model, masks)
    batches = _labelled_batches("grasp", data, weights[0].param.device)
    leaves = [w.param.detach().clone().requires_grad_() for w in weights]

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        effective = {w.name: leaf * masks[w.name] for w, leaf in zip(weights, leaves)}
        logits = _call(model, weights, effective, x, batchnorm_buffer_copies(model))
        return F.cross_entropy(logits / GRASP_TEMPERATURE, y)

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros_like(leaf) for leaf in leaves]

    with evaluation_mode(model, bn):
        stopped = zeros()
        for x, y in batches:
            for total, g in zip(stopped, torch.autograd.grad(batch_loss(x, y), leaves, allow_unused=True)):
                if g is not None:
                    total += g
        hessian_grad = zeros()
        for x, y in batches:
            grads = torch.autograd.grad(batch_loss(x, y), leaves, create_graph=True, allow_unused=True)
            dot = sum((g * s).sum() for g, s in zip(grads, stopped) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                continue  # the loss does not reach any weight twice: H g is 0
            for total, hg in zip(hessian_grad, torch.autograd.grad(dot, leaves, allow_unused=True)):
                if hg is not None:
                    total += hg
    raw = {w.name: hg * leaf.detach() for w, hg, leaf in zip(weights, hessian_grad, leaves)}
    norm = sum(r.sum() for r in raw.values()).abs() + GRASP_EPS
    return _finish(weights, {name: r / norm for name, r in raw.items()}, masks, masked_value=-torch.inf)


def synflow(model: nn.Module, data: Any, masks: Masks = None) -> Scores:
    """SynFlow: ``|P * d sum(f_P(1)) / dP|`` with every floating parameter and buffer
    replaced by its absolute value ``P``, prunable weights by ``|W| * M``, the input one
    all-ones sample shaped like the first batch's samples, the model in eval mode.

    Computed in float64 and divided by the largest score before the cast to float32:
    the output grows like the product of the layers' fan-ins, which overflows float32 on
    VGG-16-sized networks (about 1e40 and up) but stays far below float64's 1e308. A
    network that overflows even float64 raises instead of returning inf/NaN scores.
    """
    weights, masks = _setup(model, masks)
    first = next(iter_batches([data] if isinstance(data, torch.Tensor) else data, weights[0].param.device))
    ones = torch.ones((1, *first.shape[1:]), dtype=torch.float64, device=first.device)
    prunable_keys = {w.param_name for w in weights}
    others = {
        key: t.detach().abs().to(torch.float64)
        for key, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and key not in prunable_keys
    }
    leaves = {w.name: w.param.detach().abs().to(torch.float64).requires_grad_() for w in weights}
    effective = {w.name: leaves[w.name] * masks[w.name].to(torch.float64) for w in weights}
    with evaluation_mode(model, "eval"):
        output = _call(model, weights, effective, ones, others).sum()
        grads = torch.autograd.grad(output, list(leaves.values()), allow_unused=True)
    raw = {
        w.name: (g * leaves[w.name].detach()).abs() if g is not None else torch.zeros_like(leaves[w.name])
        for w, g in zip(weights, grads)
    }
    largest = max(r.max() for r in raw.values())
    if not torch.isfinite(largest):
        raise FloatingPointError(
            "synflow overflowed float64: the network is too deep for the linearized forward pass"
        )
    if largest > 0:
        raw = {name: r / largest for name, r in raw.items()}
    return _finish(weights, raw, masks)


CRITERIA: dict[str, Criterion] = {
    "px": px,
    "synflow": synflow,
    "snip": snip,
    "grasp": grasp,
    "magnitude": magnitude,
    "random": random,
}


def _keyword_options(criterion: Criterion) -> list[str]:
    parameters = inspect.signature(criterion).parameters
    return [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def checked_criterion(method: str, options: Mapping[str, Any]) -> Criterion:
    """The criterion registered as ``method``, after checking that it takes every option in
    ``options``; clear errors listing the supported methods or options."""
    criterion = CRITERIA.get(method) if isinstance(method, str) else None
    if criterion is None:
        raise ValueError(f"unknown pruning method {method!r}: supported are {sorted(CRITERIA)}")
    accepted = _keyword_options(criterion)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"method {method!r} does not take option(s) {unknown}; its options are {accepted or 'none'}"
        )
    return criterion


def score(
    method: str,
    model: nn.Module,
    data: Any,
    masks: Masks = None,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Scores:
    """Scores of ``method`` (a key of :data:`CRITERIA`) for every prunable weight of
    ``model``: ``{weight name: float32 tensor shaped like the weight}``, higher = keep.

    ``generator`` seeds ``"random"`` (the other criteria are deterministic and ignore
    it, so one call signature serves every method); ``options`` go to the criterion (``bn`` for snip,
    grasp and px, ``keep`` for px).
    """
    criterion = checked_criterion(method, options)
    if generator is not None and "generator" in _keyword_options(criterion):
        options = {**options, "generator": generator}  # deterministic criteria ignore it
    return criterion(model, data, masks, **options)


