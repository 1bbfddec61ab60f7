"""Put masks on a model as a standard ``torch.nn.utils.prune`` model, and report densities.

The result is what ``torch.nn.utils.prune`` itself produces: the parameter ``weight_orig``,
the buffer ``weight_mask`` and a forward pre-hook computing ``weight = weight_orig *
weight_mask``, so that ``prune.is_pruned``, ``prune.remove``, ``state_dict`` and training
with the masks held fixed all work as usual.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pxkern.weights import prunable_weights, resolve_masks


def _pruning_hook(module: nn.Module, tensor_name: str) -> torch_prune.BasePruningMethod:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == tensor_name:
            return hook
    raise RuntimeError(f"{type(module).__name__} has a {tensor_name}_mask but no pruning hook for it")


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the masks of the prunable weights named in ``masks`` (0/1 or bool tensors shaped
    like the weights, keyed by weight name as :func:`pxkern.weights.prunable_weights` names
    them); weights not named keep what they have.

    A weight not yet pruned gets ``torch.nn.utils.prune.custom_from_mask``. A pruned one
    gets its ``weight_mask`` buffer overwritten in place: calling ``custom_from_mask``
    again would stack a ``PruningContainer`` whose combined mask is the product of the
    old and the new one. The mask is *set*, not combined; callers that want pruned
    weights to stay pruned pass masks that already include the old ones.
    """
    weights = prunable_weights(model)
    resolved = resolve_masks(weights, masks)  # validates names, shapes, devices, 0/1 values
    for w in weights:
        if w.name not in masks:
            continue
        if w.carried_mask is None:
            torch_prune.custom_from_mask(w.module, "weight", resolved[w.name])
            continue
        with torch.no_grad():
            w.carried_mask.copy_(resolved[w.name])
        # The hook recomputes the weight at the next forward; until then the module
        # attribute would show the old mask.
        w.module.weight = _pruning_hook(w.module, "weight").apply_mask(w.module)


def density_report(model: nn.Module) -> list[tuple[str, int, int, float]]:
    """``(weight name, kept, total, kept / total)`` for every prunable weight, in module
    order, from the masks the model carries (an unpruned weight is fully kept)."""
    weights = prunable_weights(model)
    masks = resolve_masks(weights, None)
    report = []
    for w in weights:
        kept, total = int(masks[w.name].count_nonzero()), w.param.numel()
        report.append((w.name, kept, total, kept / total))
    return report
