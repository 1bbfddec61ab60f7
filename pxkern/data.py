"""Turn what users pass as data into a validated stream of input batches."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch

from pxkern.px.scaled import largest_magnitude


def _input_of(item: Any, index: int) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]  # an (x, y) pair, as data loaders yield it
    raise TypeError(
        f"data item {index} is a {type(item).__name__}: expected a tensor or an (x, y) pair"
    )


def iter_batches(data: torch.Tensor | Iterable[Any], device: torch.device) -> Iterator[torch.Tensor]:
    """Yield the input batches of ``data``: one tensor (a batch ``B x ...``), or an
    iterable of tensors or ``(x, y)`` pairs. Raises on empty data, non-floating or
    non-finite inputs and inputs on another device than the model."""
    items = [data] if isinstance(data, torch.Tensor) else data
    count = 0
    for index, item in enumerate(items):
        x = _input_of(item, index)
        if not x.is_floating_point():
            raise TypeError(f"data batch {index} has dtype {x.dtype}: expected a floating-point input")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(
                f"data batch {index} has shape {tuple(x.shape)}: expected a non-empty batch B x ..."
            )
        if x.device != device:
            raise ValueError(f"data batch {index} is on {x.device}, the model on {device}")
        if not math.isfinite(largest_magnitude([x])):
            raise ValueError(f"data batch {index} contains NaN or infinite values")
        count += 1
        yield x
    if count == 0:
        raise ValueError("data is empty: px scores need at least one batch")
