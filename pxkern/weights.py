"""Which weights of a model are prunable, what they are called, and their masks.

A prunable weight is the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
(subclasses included). Users know it by ``"<module>.weight"`` also when the module was
pruned with ``torch.nn.utils.prune``, where the parameter is ``weight_orig`` and the mask
the buffer ``weight_mask``: that name is the key of every dict this package returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable weight: ``name`` is the user-facing key, ``param_name`` the
    key of the parameter in ``model.named_parameters()`` (``...weight_orig`` when pruned)."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    param: nn.Parameter
    carried_mask: torch.Tensor | None  # the torch.nn.utils.prune buffer, if any

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prunable_weights(model: nn.Module) -> list[PrunableWeight]:
    """The prunable weights of ``model`` in module order.

    Raises NotImplementedError for a weight tensor shared by two modules (tied weights):
    a mask put on one module by ``torch.nn.utils.prune`` would not reach the other, so
    such a weight has no single meaning as a prunable weight."""
    found = []
    owners: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        pruned = "weight_orig" in module._parameters
        local = "weight_orig" if pruned else "weight"
        param = module._parameters.get(local)
        if param is None:
            continue
        owner = owners.setdefault(id(param), module_name)
        if owner != module_name:
            raise NotImplementedError(
                f"modules '{owner}' and '{module_name}' share one weight tensor (tied "
                f"weights): pxkern scores and prunes weights that belong to one module; "
                f"untie them (e.g. clone the weight) to score the model"
            )
        found.append(
            PrunableWeight(
                name=_join(module_name, "weight"),
                module_name=module_name,
                module=module,
                param_name=_join(module_name, local),
                param=param,
                carried_mask=module._buffers.get("weight_mask") if pruned else None,
            )
        )
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no prunable weights: pxkern prunes the weight of "
            f"nn.Linear and nn.Conv1d/2d/3d modules (subclasses included)"
        )
    return found


def last_linear_name(model: nn.Module) -> str | None:
    """Module name of the last ``nn.Linear`` in module order: the default kept classifier."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def resolve_masks(
    weights: Iterable[PrunableWeight], masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """One float 0/1 mask per prunable weight, keyed by its name.

    Explicit ``masks`` win; otherwise the masks the model carries; otherwise all ones
    (returned as an expanded ones tensor so that "unmasked" stays recognisable).
    """
    weights = list(weights)
    known = {w.name for w in weights}
    if masks is not None:
        unknown = sorted(set(masks) - known)
        if unknown:
            raise KeyError(
                f"masks has keys that are not prunable weights of the model: {unknown[:5]}; "
                f"expected names like {sorted(known)[:3]}"
            )
    resolved = {}
    for w in weights:
        given = masks.get(w.name) if masks is not None else None
        mask = given if given is not None else w.carried_mask
        if mask is None:
            resolved[w.name] = torch.ones((), dtype=w.param.dtype, device=w.param.device).expand(w.shape)
            continue
        if mask.shape != w.shape:
            raise ValueError(f"mask for {w.name} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        if mask.device != w.param.device:
            raise ValueError(f"mask for {w.name} is on {mask.device}, the weight on {w.param.device}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"mask for {w.name} must hold only 0 and 1 (or be bool)")
        resolved[w.name] = mask.detach().to(w.param.dtype)
    return resolved


def is_all_ones(mask: torch.Tensor) -> bool:
    """True for the expanded all-ones masks made by :func:`resolve_masks` or any mask
    whose entries are all 1."""
    if mask.numel() and all(s == 0 for s in mask.stride()):
        return bool(mask.reshape(-1)[:1].item() == 1)
    return bool(mask.all())
