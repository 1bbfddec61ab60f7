"""BlockSparseMatrix against dense tensors and torch.sparse_bsr as independent references.

Everything here moves or gathers values without arithmetic, so every comparison is exact.
"""

from __future__ import annotations

import re

import pytest
import torch

from pxkern.sparse import BlockSparseMatrix

pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta state")

BLOCKS = [(8, 8), (16, 16), (32, 32), (64, 64), (16, 32), (32, 8)]
GRIDS = [(3, 5), (1, 1), (4, 1)]  # block rows x block columns; 3 x 5 of 32 x 32 is 96 x 160
DENSITIES = [1.0, 0.3, 0.0]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
FIELDS = BlockSparseMatrix.__slots__


def _block_sparse_dense(grid, block, density, dtype, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense ``[grid * block]`` matrix whose nonzero blocks are a random ``density`` of
    the grid, and that bool block mask. Kept blocks have zeros inside them too, but never
    only zeros."""
    generator = torch.Generator().manual_seed(seed)
    (gm, gn), (bm, bn) = grid, block
    kept = round(density * gm * gn)
    mask = torch.zeros(gm * gn, dtype=torch.bool)
    mask[torch.randperm(gm * gn, generator=generator)[:kept]] = True
    mask = mask.reshape(gm, gn)
    dense = torch.randn(gm * bm, gn * bn, generator=generator, dtype=torch.float64)
    dense[torch.rand(dense.shape, generator=generator) < 0.5] = 0
    dense[::bm, ::bn] = 1.0
    dense *= mask.repeat_interleave(bm, 0).repeat_interleave(bn, 1)
    return dense.to(dtype), mask


def _loop_block_mask(dense: torch.Tensor, block) -> torch.Tensor:
    bm, bn = block
    return torch.tensor(
        [[bool(dense[i : i + bm, j : j + bn].ne(0).any()) for j in range(0, dense.shape[1], bn)]
         for i in range(0, dense.shape[0], bm)],
        dtype=torch.bool,
    )


def _assert_exact(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def _assert_same_matrix(actual: BlockSparseMatrix, expected: BlockSparseMatrix) -> None:
    for field in FIELDS:
        a, e = getattr(actual, field), getattr(expected, field)
        if isinstance(e, torch.Tensor):
            _assert_exact(a, e, field)
        else:
            assert a == e, f"{field}: {a} != {e}"


def _assert_matches_torch_bsr(row_offsets, column_indices, values, reference: torch.Tensor, what: str) -> None:
    """Compare BSR metadata with a torch.sparse_bsr tensor (int64 indices by default)."""
    _assert_exact(row_offsets.long(), reference.crow_indices().long(), f"{what} row offsets vs crow_indices")
    _assert_exact(column_indices.long(), reference.col_indices().long(), f"{what} column indices vs col_indices")
    if values is not None:
        _assert_exact(values, reference.values(), f"{what} values")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"grid{g[0]}x{g[1]}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
def test_dense_round_trip(block, grid, density, dtype):
    dense, mask = _block_sparse_dense(grid, block, density, dtype)
    matrix = BlockSparseMatrix.from_dense(dense, block)

    assert matrix.shape == tuple(dense.shape) and matrix.block == block
    assert matrix.values.dtype == dtype and matrix.values.shape == (int(mask.sum()), *block)
    for field in ("row_offsets", "column_indices", "transpose_row_offsets", "transpose_column_indices",
                  "transpose_block_order"):
        assert getattr(matrix, field).dtype == torch.int32, field
    assert matrix.nnz_blocks == int(mask.sum())
    assert matrix.density == int(mask.sum()) / mask.numel()
    _assert_exact(matrix.block_mask(), _loop_block_mask(dense, block), "block_mask()")
    _assert_exact(matrix.to_dense(), dense, "to_dense()")
    _assert_matches_torch_bsr(matrix.row_offsets, matrix.column_indices, matrix.values,
                              dense.to_sparse_bsr(block), "from_dense")


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
def test_transpose(block, density):
    dense, _ = _block_sparse_dense((3, 5), block, density, torch.float32, seed=1)
    matrix = BlockSparseMatrix.from_dense(dense, block)
    reference = dense.T.contiguous().to_sparse_bsr(block[::-1])
    _assert_matches_torch_bsr(matrix.transpose_row_offsets, matrix.transpose_column_indices, None,
                              reference, "precomputed transposed")

    transposed = matrix.transpose()
    assert transposed.shape == (dense.shape[1], dense.shape[0]) and transposed.block == block[::-1]
    _assert_exact(transposed.to_dense(), dense.T, "transpose().to_dense()")
    _assert_same_matrix(transposed, BlockSparseMatrix.from_dense(dense.T.contiguous(), block[::-1]))
    _assert_same_matrix(transposed.transpose(), matrix)


def test_from_dense_keeps_blocks_with_any_nonzero():
    dense = torch.zeros(16, 32)
    dense[3, 5] = -1e-30  # a single tiny negative entry
    dense[9, 30] = float("nan")
    expected = torch.tensor([[True, False], [False, True]])
    _assert_exact(BlockSparseMatrix.from_dense(dense, (8, 16)).block_mask(), expected, "block_mask()")


def test_block_mask_keeps_selected_blocks_even_if_zero():
    block = (16, 32)
    dense, nonzero = _block_sparse_dense((4, 3), block, 0.5, torch.float32, seed=2)
    selected = torch.zeros_like(nonzero)
    selected[::2] = True  # half the selected blocks are all zero, half the nonzero ones dropped
    assert bool((selected & ~nonzero).any()) and bool((nonzero & ~selected).any())

    matrix = BlockSparseMatrix.from_block_mask(dense, block, selected)
    _assert_exact(matrix.block_mask(), selected, "block_mask()")
    assert matrix.nnz_blocks == int(selected.sum())
    element_mask = selected.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    _assert_exact(matrix.to_dense(), dense * element_mask, "to_dense()")
    _assert_same_matrix(matrix.transpose(), BlockSparseMatrix.from_block_mask(dense.T.contiguous(), block[::-1],
                                                                             selected.T.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("block", [(8, 8), (16, 32), (32, 8)], ids=lambda b: f"block{b[0]}x{b[1]}")
def test_torch_sparse_bsr_interop(block, dtype):
    dense, _ = _block_sparse_dense((3, 5), block, 0.3, dtype, seed=3)
    reference = dense.to_sparse_bsr(block)

    adopted = BlockSparseMatrix.from_torch_sparse_bsr(reference)
    _assert_matches_torch_bsr(adopted.row_offsets, adopted.column_indices, adopted.values, reference,
                              "from_torch_sparse_bsr")
    _assert_same_matrix(adopted, BlockSparseMatrix.from_dense(dense, block))

    exported = adopted.to_torch_sparse_bsr()
    assert exported.layout == torch.sparse_bsr and exported.shape == dense.shape
    _assert_matches_torch_bsr(exported.crow_indices(), exported.col_indices(), exported.values(), reference,
                              "to_torch_sparse_bsr")
    _assert_exact(exported.to_dense(), dense, "to_torch_sparse_bsr().to_dense()")
    _assert_same_matrix(BlockSparseMatrix.from_torch_sparse_bsr(exported), adopted)


def test_zero_block_matrix():
    matrix = BlockSparseMatrix.from_dense(torch.zeros(64, 96), (32, 16))
    assert matrix.nnz_blocks == 0 and matrix.density == 0.0
    assert matrix.values.shape == (0, 32, 16)
    _assert_exact(matrix.row_offsets, torch.zeros(3, dtype=torch.int32), "row_offsets")
    _assert_exact(matrix.transpose_row_offsets, torch.zeros(7, dtype=torch.int32), "transpose_row_offsets")
    _assert_exact(matrix.to_dense(), torch.zeros(64, 96), "to_dense()")
    _assert_exact(matrix.block_mask(), torch.zeros(2, 6, dtype=torch.bool), "block_mask()")
    _assert_exact(matrix.transpose().to_dense(), torch.zeros(96, 64), "transpose().to_dense()")
    _assert_exact(matrix.to(torch.bfloat16).to_dense(), torch.zeros(64, 96, dtype=torch.bfloat16), "to()")
    _assert_exact(matrix.to_torch_sparse_bsr().to_dense(), torch.zeros(64, 96), "to_torch_sparse_bsr()")
    empty = BlockSparseMatrix(torch.zeros(0, 8, 8), torch.zeros(2, dtype=torch.int32),
                              torch.zeros(0, dtype=torch.int32), (8, 24))
    _assert_same_matrix(BlockSparseMatrix.from_torch_sparse_bsr(empty.to_torch_sparse_bsr()), empty)


def test_to_casts_values_and_shares_metadata():
    dense, _ = _block_sparse_dense((3, 5), (16, 16), 0.3, torch.float32, seed=4)
    matrix = BlockSparseMatrix.from_dense(dense, (16, 16))
    assert matrix.to(torch.float32) is matrix
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cast = matrix.to(dtype)
        _assert_exact(cast.to_dense(), dense.to(dtype), f"to({dtype})")
        for field in FIELDS:
            if field not in ("values", "shape", "block"):
                assert getattr(cast, field) is getattr(matrix, field), f"to({dtype}) copied {field}"
    with pytest.raises(TypeError, match=re.escape("dtype must be torch.float32 or")):
        matrix.to(torch.int32)


def test_fields_cannot_be_reassigned():
    matrix = BlockSparseMatrix.from_dense(torch.ones(8, 8), (8, 8))
    with pytest.raises(AttributeError, match="immutable"):
        matrix.values = torch.zeros(1, 8, 8)


# A valid 16 x 24 matrix of 8 x 8 blocks: block row 0 holds columns 0 and 2, row 1 column 1.
def _parts(**changes):
    parts = {
        "values": torch.randn(3, 8, 8),
        "row_offsets": torch.tensor([0, 2, 3], dtype=torch.int32),
        "column_indices": torch.tensor([0, 2, 1], dtype=torch.int32),
        "shape": (16, 24),
    }
    parts.update(changes)
    return parts


def _indices(*values):
    return torch.tensor(values, dtype=torch.int32)


INVALID = {
    "block does not divide rows": (
        lambda: BlockSparseMatrix.from_dense(torch.randn(100, 64), (32, 32)),
        ValueError, "block size 32 does not divide 100 rows"),
    "block does not divide cols": (
        lambda: BlockSparseMatrix.from_dense(torch.randn(64, 100), (32, 16)),
        ValueError, "block size 16 does not divide 100 cols"),
    "values block does not divide shape": (
        lambda: BlockSparseMatrix(**_parts(shape=(16, 20))),
        ValueError, "block size 8 does not divide 20 cols"),
    "zero block size": (
        lambda: BlockSparseMatrix(**_parts(values=torch.randn(3, 0, 8))),
        ValueError, "sizes must be positive"),
    "block not two ints": (
        lambda: BlockSparseMatrix.from_dense(torch.randn(16, 16), 8),
        TypeError, "block must be two ints (bm, bn), got 8"),
    "unsorted columns": (
        lambda: BlockSparseMatrix(**_parts(column_indices=_indices(2, 0, 1))),
        ValueError, ("column_indices must be strictly increasing within each block row, got "
                    "column_indices[0] = 2 then column_indices[1] = 0 in block row 0")),
    "duplicate columns": (
        lambda: BlockSparseMatrix(**_parts(column_indices=_indices(1, 1, 1))),
        ValueError, "column_indices[0] = 1 then column_indices[1] = 1"),
    "column out of range": (
        lambda: BlockSparseMatrix(**_parts(column_indices=_indices(0, 3, 1))),
        ValueError, "column_indices must lie in [0, cols / bn = 3), got column_indices[1] = 3"),
    "negative column": (
        lambda: BlockSparseMatrix(**_parts(column_indices=_indices(0, 2, -1))),
        ValueError, "got column_indices[2] = -1"),
    "int64 row offsets": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=torch.tensor([0, 2, 3]))),
        TypeError, "row_offsets must have dtype torch.int32, got torch.int64"),
    "int64 column indices": (
        lambda: BlockSparseMatrix(**_parts(column_indices=torch.tensor([0, 2, 1]))),
        TypeError, "column_indices must have dtype torch.int32, got torch.int64"),
    "integer values": (
        lambda: BlockSparseMatrix(**_parts(values=torch.ones(3, 8, 8, dtype=torch.int32))),
        TypeError, ("values must have dtype torch.float32 or torch.float64 or torch.float16 or "
                   "torch.bfloat16, got torch.int32")),
    "2-D values": (
        lambda: BlockSparseMatrix(**_parts(values=torch.randn(3, 64))),
        ValueError, "values must be 3-D, got shape [3, 64]"),
    "offsets not a tensor": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=[0, 2, 3])),
        TypeError, "row_offsets must be a torch.Tensor, got list"),
    "offsets on another device": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=torch.empty(3, dtype=torch.int32, device="meta"))),
        ValueError, "row_offsets is on meta, values on cpu; all fields must share a device"),
    "columns on another device": (
        lambda: BlockSparseMatrix(**_parts(column_indices=torch.empty(3, dtype=torch.int32, device="meta"))),
        ValueError, "column_indices is on meta, values on cpu"),
    "offsets length does not match shape": (
        lambda: BlockSparseMatrix(**_parts(shape=(24, 24))),
        ValueError, "row_offsets must have rows / bm + 1 = 4 entries, got 3"),
    "columns length does not match values": (
        lambda: BlockSparseMatrix(**_parts(values=torch.randn(2, 8, 8))),
        ValueError, "column_indices must have nnz_blocks = values.shape[0] = 2 entries, got 3"),
    "offsets not starting at 0": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=_indices(1, 2, 3))),
        ValueError, "row_offsets must start at 0 and end at nnz_blocks = 3, got 1 ... 3"),
    "offsets not ending at nnz": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=_indices(0, 2, 2))),
        ValueError, "row_offsets must start at 0 and end at nnz_blocks = 3, got 0 ... 2"),
    "offsets decreasing": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=_indices(0, 4, 3))),
        ValueError, "row_offsets must be non-decreasing, got row_offsets[1] = 4 > row_offsets[2] = 3"),
    "non-contiguous values": (
        lambda: BlockSparseMatrix(**_parts(values=torch.randn(3, 8, 8).transpose(1, 2))),
        ValueError, "values must be contiguous"),
    "non-contiguous offsets": (
        lambda: BlockSparseMatrix(**_parts(row_offsets=_indices(0, 9, 2, 9, 3, 9)[::2])),
        ValueError, "row_offsets must be contiguous"),
    "empty matrix from dense": (
        lambda: BlockSparseMatrix.from_dense(torch.zeros(0, 64), (8, 8)),
        ValueError, "dense.shape [0, 64] is an empty matrix"),
    "empty matrix shape": (
        lambda: BlockSparseMatrix(**_parts(shape=(16, 0))),
        ValueError, "shape [16, 0] is an empty matrix"),
    "shape not ints": (
        lambda: BlockSparseMatrix(**_parts(shape=(16.0, 24))),
        TypeError, "shape must be two ints (rows, cols), got (16.0, 24)"),
    "3-D dense": (
        lambda: BlockSparseMatrix.from_dense(torch.zeros(2, 8, 8), (8, 8)),
        ValueError, "dense must be 2-D, got shape [2, 8, 8]"),
    "block mask of the wrong shape": (
        lambda: BlockSparseMatrix.from_block_mask(torch.zeros(16, 24), (8, 8), torch.ones(16, 24, dtype=torch.bool)),
        ValueError, ("block_mask must have shape [rows / bm, cols / bn] = [2, 3] for dense [16, 24] and block "
                    "[8, 8], got [16, 24]")),
    "block mask not bool": (
        lambda: BlockSparseMatrix.from_block_mask(torch.zeros(16, 24), (8, 8), torch.ones(2, 3)),
        TypeError, "block_mask must have dtype torch.bool, got torch.float32"),
    "not a BSR tensor": (
        lambda: BlockSparseMatrix.from_torch_sparse_bsr(torch.zeros(8, 8).to_sparse_csr()),
        TypeError, "tensor must be a torch.sparse_bsr tensor, got torch.sparse_csr"),
    "batched BSR tensor": (
        lambda: BlockSparseMatrix.from_torch_sparse_bsr(torch.ones(2, 8, 8).to_sparse_bsr((4, 4))),
        ValueError, "tensor must be a 2-D BSR matrix without batch or dense dimensions, got shape [2, 8, 8]"),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_input_is_rejected(name):
    build, error, message = INVALID[name]
    with pytest.raises(error, match=re.escape(message)):
        build()
