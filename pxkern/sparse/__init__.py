"""Block-sparse weights: the BSR format, inference modules, and ``sparsify``."""

from pxkern.sparse.format import BlockSparseMatrix
from pxkern.sparse.modules import BlockSparseConv2d, BlockSparseLinear
from pxkern.sparse.sparsify import LayerDecision, sparsify

__all__ = ["BlockSparseMatrix", "BlockSparseConv2d", "BlockSparseLinear", "LayerDecision", "sparsify"]
