"""``sparsify``: serve a pruned model with block-sparse layers where that is faster."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pxkern.pruning.blocks import check_block
from pxkern.sparse.format import BlockSparseMatrix, nonzero_blocks
from pxkern.sparse.modules import BlockSparseConv2d, BlockSparseLinear

FORMATS = ("auto", "bsr", "dense")
CANDIDATE_BLOCKS = ((64, 64), (32, 32), (16, 16), (8, 8))

# Without a measurement, a layer turns block-sparse when at most this fraction of its
# blocks is kept: bench_bsr puts the block-sparse product well ahead of MKL's
# dense one there, and the margin shrinks fast above it.
UNMEASURED_MAX_BLOCK_DENSITY = 0.3
# With block=None the largest candidate block is chosen whose block density stays within
# this factor of the weight's own density: larger blocks run faster per stored weight, but
# only while they do not store many zeros.
BLOCK_FILL_SLACK = 1.25


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`sparsify` did with one Linear or Conv2d and why."""

    name: str
    kind: str  # "bsr" or "dense"
    block: tuple[int, int] | None
    block_density: float | None
    reason: str


def _pruned_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):  # subclasses may compute differently
            yield name, module


def _matrix(module: nn.Module) -> torch.Tensor:
    """The effective (masked) weight as ``[out, in*kh*kw]``."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _divides(block: tuple[int, int], matrix: torch.Tensor) -> bool:
    return matrix.shape[0] % block[0] == 0 and matrix.shape[1] % block[1] == 0


def choose_blocks(
    matrix: torch.Tensor, block: tuple[int, int] | None
) -> tuple[tuple[int, int], torch.Tensor] | None:
    """The block size to store ``matrix`` with, and which of its blocks hold a nonzero
    (:func:`~pxkern.sparse.format.nonzero_blocks`): ``block`` if it divides the matrix,
    else (``block=None``) the largest of :data:`CANDIDATE_BLOCKS` that divides it and
    whose block density stays within :data:`BLOCK_FILL_SLACK` of its density; None if
    none fits."""
    if block is not None:
        block = tuple(block)
        return (block, nonzero_blocks(matrix, block)) if _divides(block, matrix) else None
    finest = CANDIDATE_BLOCKS[-1]
    if not _divides(finest, matrix):
        return None
    density = float(matrix.count_nonzero()) / max(matrix.numel(), 1)
    # One pass over the matrix; the coarser candidates (multiples of the finest) reduce
    # its small block mask further.
    fine = nonzero_blocks(matrix, finest).float()
    for candidate in CANDIDATE_BLOCKS:
        if _divides(candidate, matrix):
            kept = nonzero_blocks(fine, (candidate[0] // finest[0], candidate[1] // finest[1]))
            if float(kept.float().mean()) <= BLOCK_FILL_SLACK * density + 1e-12:
                return candidate, kept
    return None


def _sparse_module(module: nn.Module, block: tuple[int, int], kept: torch.Tensor) -> nn.Module:
    if isinstance(module, nn.Linear):
        return BlockSparseLinear(BlockSparseMatrix.from_block_mask(_matrix(module), block, kept), module.bias)
    return BlockSparseConv2d.from_conv2d(module, block)


def _median_seconds(fn, x: torch.Tensor, repeats: int = 5) -> float:
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, torch.Size]:
    shapes: dict[nn.Module, torch.Size] = {}

    def record(module: nn.Module, args: tuple) -> None:  # returns None: arguments unchanged
        shapes.setdefault(module, args[0].shape)

    hooks = [m.register_forward_pre_hook(record) for _, m in _pruned_layers(model)]
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sparsify(
    model: nn.Module,
    *,
    block: tuple[int, int] | None = None,
    format: str = "auto",
    example_input: torch.Tensor | None = None,
) -> list[LayerDecision]:
    """Replace the pruned ``nn.Linear``/``nn.Conv2d`` layers of ``model`` (in place) by
    block-sparse modules with the same outputs; returns what was done per layer.

    Args:
        model: a model whose zero weights are pruned (``torch.nn.utils.prune`` or zeros).
        block: ``(bm, bn)`` blocks of the ``[C_out, C_in*kh*kw]`` weight matrix; ``None``
            picks per layer the largest of 64/32/16/8 squares that stores few extra zeros.
        format: ``"bsr"`` converts every layer it can, ``"dense"`` none, ``"auto"`` those
            measured faster on ``example_input``'s shapes, or without one those keeping at
            most ``UNMEASURED_MAX_BLOCK_DENSITY`` of their blocks.
        example_input: a batch to measure the layers on (``format="auto"`` only).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if block is not None:
        check_block(block)
    if example_input is not None and format != "auto":
        raise ValueError("example_input is only used by format='auto'")
    shapes = _input_shapes(model, example_input) if example_input is not None else {}
    decisions = []
    for name, module in list(_pruned_layers(model)):
        matrix = _matrix(module)
        choice = choose_blocks(matrix, block)
        if choice is None:
            decisions.append(LayerDecision(name, "dense", None, None, "no block size divides the weight matrix or fits its sparsity"))
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            decisions.append(LayerDecision(name, "dense", None, None, "grouped or non-zero-padded convolution"))
            continue
        chosen, kept = choice
        sparse = _sparse_module(module, chosen, kept)
        block_density = sparse.weight.density
        if format == "dense":
            keep_sparse, reason = False, "format='dense'"
        elif format == "bsr":
            keep_sparse, reason = True, "format='bsr'"
        elif module in shapes:
            x = torch.randn(shapes[module], dtype=matrix.dtype, device=matrix.device)
            dense_s, sparse_s = _median_seconds(module, x), _median_seconds(sparse, x)
            keep_sparse = sparse_s < dense_s
            reason = f"measured {sparse_s * 1e3:.3f} ms block-sparse vs {dense_s * 1e3:.3f} ms dense"
        else:
            keep_sparse = block_density <= UNMEASURED_MAX_BLOCK_DENSITY
            reason = f"block density {block_density:.3f} vs threshold {UNMEASURED_MAX_BLOCK_DENSITY}"
        if keep_sparse:
            _set_submodule(model, name, sparse)
        decisions.append(LayerDecision(name, "bsr" if keep_sparse else "dense", chosen, block_density, reason))
    return decisions
