"""Inference modules whose weight is a :class:`BlockSparseMatrix`.

``BlockSparseLinear`` computes ``x @ W^T + b``; ``BlockSparseConv2d`` lowers the
convolution to ``W @ unfold(x)`` with ``W`` the ``[C_out, C_in*kh*kw]`` matrix. Both are
forward-only (pruned models are served, not trained, in this form), keep their block-sparse
weight as buffers so that ``state_dict`` round-trips, and accept a state dict of another
number of blocks (the sparsity pattern is data, not architecture).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear
from pxkern.sparse.format import BlockSparseMatrix

_WEIGHT_BUFFERS = ("values", "row_offsets", "column_indices")


class _BlockSparseWeight(nn.Module):
    """Holds a block-sparse weight (and bias) as buffers."""

    def __init__(self, weight: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_shape = weight.shape
        self.register_buffer("values", weight.values)
        self.register_buffer("row_offsets", weight.row_offsets)
        self.register_buffer("column_indices", weight.column_indices)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> BlockSparseMatrix:
        return BlockSparseMatrix(self.values, self.row_offsets, self.column_indices, self.weight_shape)

    def _matrix_arguments(self) -> tuple:
        return self.values, self.row_offsets, self.column_indices, list(self.weight_shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The number of blocks is data: take the loaded tensors whole (validated by the
        # format) instead of copying into buffers of the current size.
        loaded = {name: state_dict.get(prefix + name) for name in _WEIGHT_BUFFERS}
        if all(t is not None for t in loaded.values()):
            BlockSparseMatrix(loaded["values"], loaded["row_offsets"], loaded["column_indices"], self.weight_shape)
            for name, tensor in loaded.items():
                setattr(self, name, tensor.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        weight = self.weight
        return (f"shape={list(weight.shape)}, block={list(weight.block)}, "
                f"block_density={weight.density:.3f}, bias={self.bias is not None}")


class BlockSparseLinear(_BlockSparseWeight):
    """``y = x @ W^T + b`` for ``x`` of shape ``[..., in_features]``, ``W`` block-sparse
    ``[out_features, in_features]``.

    The kernel reads each block transposed; the layer keeps that copy of ``values``
    (not in its ``state_dict``) and makes it again when ``values`` is replaced or changed
    in place (a new tensor or a new version of it), instead of on every call."""

    def __init__(self, weight: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        # (values, its version, values with every block transposed)
        self._transposed_blocks: tuple[torch.Tensor, int, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int]) -> "BlockSparseLinear":
        return cls(BlockSparseMatrix.from_dense(linear.weight.detach(), block), linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def _transposed(self) -> torch.Tensor | None:
        values = self.values
        if values.is_inference():  # no version counter to tell an in-place change
            return None
        kept = self._transposed_blocks
        if kept is None or kept[0] is not values or kept[1] != values._version:
            # A normal tensor even when made under inference_mode: later calls may record
            # autograd.
            with torch.inference_mode(False):
                blocks = values.detach().transpose(1, 2).contiguous()
            kept = self._transposed_blocks = values, values._version, blocks
        return kept[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bsr_linear(*self._matrix_arguments(), x, self.bias, transposed_blocks=self._transposed())


class BlockSparseConv2d(_BlockSparseWeight):
    """A zero-padded, ungrouped 2-D convolution with a block-sparse
    ``[C_out, C_in*kh*kw]`` weight, computed as ``W @ unfold(x)``."""

    def __init__(self, weight: BlockSparseMatrix, bias: torch.Tensor | None, in_channels: int,
                 kernel_size: tuple[int, int], stride, padding, dilation) -> None:
        super().__init__(weight, bias)
        if weight.shape[1] != in_channels * kernel_size[0] * kernel_size[1]:
            raise ValueError(
                f"weight has {weight.shape[1]} columns, expected in_channels * kh * kw = "
                f"{in_channels * kernel_size[0] * kernel_size[1]}"
            )
        self.in_channels = in_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, block: tuple[int, int]) -> "BlockSparseConv2d":
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"BlockSparseConv2d needs groups=1, zero padding given as numbers; got "
                f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        matrix = conv.weight.detach().reshape(conv.out_channels, -1)
        return cls(BlockSparseMatrix.from_dense(matrix, block), conv.bias, conv.in_channels,
                   conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BlockSparseConv2d expects x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        n, _, h, w = x.shape
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, K, L]
        out_h, out_w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)
        )
        panel = columns.transpose(0, 1).reshape(columns.shape[1], -1)  # [K, N*L]
        y = bsr_dense_mm(*self._matrix_arguments(), panel.contiguous(), self.bias)  # [C_out, N*L]
        return y.reshape(self.out_channels, n, out_h, out_w).transpose(0, 1)
