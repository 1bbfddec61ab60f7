"""The block-sparse (BSR) weight format."""

from pxkern.sparse.format import BlockSparseMatrix

__all__ = ["BlockSparseMatrix"]
