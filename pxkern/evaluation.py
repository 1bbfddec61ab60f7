"""Evaluating a model with substituted values without changing it.

Scoring criteria run the user's model through ``torch.func.functional_call``. What that
leaves behind, and these helpers put back or keep away from the model: train/eval flags,
the plain ``weight`` attributes ``torch.nn.utils.prune`` hooks recompute on every forward,
and BatchNorm running statistics updated in train mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.prune import BasePruningMethod

from pxkern.weights import PrunableWeight

BN_MODES = ("eval", "batch")


def check_bn_mode(bn: str) -> None:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")


@contextlib.contextmanager
def model_state_restored(model: nn.Module) -> Iterator[None]:
    """Give back the training flags and the tensors prune hooks store on modules."""
    training = [(m, m.training) for m in model.modules()]
    pruned = [
        (m, hook._tensor_name, m.__dict__.get(hook._tensor_name))
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, BasePruningMethod)
    ]
    try:
        yield
    finally:
        for m, flag in training:
            # Only where it changed: nn.Module.__setattr__ costs microseconds, and a prune
            # restores the flags of every module in every round.
            if m.training != flag:
                m.training = flag
        for m, name, value in pruned:
            if value is None:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = value


def set_mode(model: nn.Module, *, batch_statistics: bool) -> None:
    """Eval mode (dropout off); BatchNorm on batch statistics if ``batch_statistics``."""
    model.eval()
    if batch_statistics:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()


def batchnorm_buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm buffers, for train-mode BatchNorm to update instead of the
    model's running statistics."""
    return {
        f"{name}.{key}" if name else key: buf.clone()
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for key, buf in module._buffers.items()
        if buf is not None
    }


def unit_prune_masks(weights: Iterable[PrunableWeight], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All-ones ``weight_mask`` buffers for the pruned modules: substituted weights are
    already masked with the masks being scored, which may differ from the carried ones."""
    return {
        w.param_name.removesuffix("_orig") + "_mask":
            torch.ones((), dtype=dtype, device=w.carried_mask.device).expand(w.shape)
        for w in weights
        if w.carried_mask is not None
    }


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, bn: str) -> Iterator[None]:
    """The model in eval mode (BatchNorm on batch statistics for ``bn="batch"``) for the
    duration of the block, then exactly as before."""
    check_bn_mode(bn)
    with model_state_restored(model):
        set_mode(model, batch_statistics=bn == "batch")
        yield
