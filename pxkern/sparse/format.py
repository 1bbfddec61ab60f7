"""The block-sparse (BSR) weight format: one class that owns all of its metadata.

A ``[rows, cols]`` matrix is cut into ``bm x bn`` blocks; the blocks that are kept are
stored block row by block row (the layout of ``torch.sparse_bsr`` and of stk's BCSR
matrix)::

    values                    [nnz_blocks, bm, bn]   float32 / float64 / float16 / bfloat16
    row_offsets               [rows / bm + 1]        int32, blocks of block row r are
                                                     values[row_offsets[r]:row_offsets[r + 1]]
    column_indices            [nnz_blocks]           int32, block column of each block,
                                                     strictly increasing within a block row

The same structure read block column by block column is precomputed at construction, so
that a transpose (the backward of a sparse linear layer) needs no sort::

    transpose_row_offsets     [cols / bn + 1]        int32, blocks of block column c are the
                                                     entries transpose_row_offsets[c]:[c + 1]
    transpose_column_indices  [nnz_blocks]           int32, block row of each such block
    transpose_block_order     [nnz_blocks]           int32, index into ``values`` of each such block

Every construction validates the metadata, so kernels may trust it.
"""

from __future__ import annotations

import torch

__all__ = ["BlockSparseMatrix"]

VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPE = torch.int32
_INT32_MAX = torch.iinfo(torch.int32).max

# (row_offsets, column_indices, block_order) of the block-column-major view.
_Transposed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_shape(shape: object, name: str) -> tuple[int, int]:
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if dims is None or len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{name} must be two ints (rows, cols), got {shape!r}")
    rows, cols = dims
    if rows < 0 or cols < 0:
        raise ValueError(f"{name} must be non-negative, got {list(dims)}")
    if rows == 0 or cols == 0:
        raise ValueError(
            f"{name} {list(dims)} is an empty matrix; BlockSparseMatrix needs at least one row and one column"
        )
    return rows, cols


def _check_block(block: object, shape: tuple[int, int], name: str) -> tuple[int, int]:
    dims = tuple(block) if isinstance(block, (tuple, list, torch.Size)) else None
    if dims is None or len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{name} must be two ints (bm, bn), got {block!r}")
    for size, extent, what in zip(dims, shape, ("rows", "cols")):
        if size <= 0:
            raise ValueError(f"{name} sizes must be positive, got {list(dims)}")
        if extent % size:
            raise ValueError(f"block size {size} does not divide {extent} {what} (shape {list(shape)})")
    return dims[0], dims[1]


def _check_tensor(t: object, name: str, dtypes: tuple[torch.dtype, ...], dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a strided (dense) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {list(t.shape)}")
    return t


def _block_rows(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """int64 ``[nnz]``: the block row of each block (requires valid ``row_offsets``)."""
    counts = row_offsets.diff()
    rows = torch.arange(counts.numel(), device=row_offsets.device)
    return rows.repeat_interleave(counts, output_size=nnz)


def _validate(
    values: object, row_offsets: object, column_indices: object, shape: object
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check the three stored fields against ``shape``; return ``(shape, block)``."""
    rows, cols = _check_shape(shape, "shape")
    values = _check_tensor(values, "values", VALUE_DTYPES, 3)
    nnz, bm, bn = values.shape
    block = _check_block((bm, bn), (rows, cols), "values.shape[1:] (the block)")
    block_rows, block_cols = rows // bm, cols // bn
    for name, t, length in (("row_offsets", row_offsets, block_rows + 1), ("column_indices", column_indices, nnz)):
        t = _check_tensor(t, name, (INDEX_DTYPE,), 1)
        if t.numel() != length:
            expected = "rows / bm + 1" if name == "row_offsets" else "nnz_blocks = values.shape[0]"
            raise ValueError(f"{name} must have {expected} = {length} entries, got {t.numel()}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device}, values on {values.device}; all fields must share a device")
    for name, t in (("values", values), ("row_offsets", row_offsets), ("column_indices", column_indices)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")

    first, last = int(row_offsets[0]), int(row_offsets[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"row_offsets must start at 0 and end at nnz_blocks = {nnz}, got {first} ... {last}")
    decreasing = (row_offsets.diff() < 0).nonzero()
    if decreasing.numel():
        r = int(decreasing[0])
        raise ValueError(
            f"row_offsets must be non-decreasing, got row_offsets[{r}] = {int(row_offsets[r])} > "
            f"row_offsets[{r + 1}] = {int(row_offsets[r + 1])}"
        )
    if nnz == 0:
        return (rows, cols), block
    outside = ((column_indices < 0) | (column_indices >= block_cols)).nonzero()
    if outside.numel():
        k = int(outside[0])
        raise ValueError(
            f"column_indices must lie in [0, cols / bn = {block_cols}), got column_indices[{k}] = "
            f"{int(column_indices[k])}"
        )
    # With rows non-decreasing and columns in range, one strictly increasing (row, column)
    # key is exactly "sorted and unique within each block row".
    key = _block_rows(row_offsets, nnz) * block_cols + column_indices
    unsorted = (key.diff() <= 0).nonzero()
    if unsorted.numel():
        k = int(unsorted[0])
        raise ValueError(
            f"column_indices must be strictly increasing within each block row, got "
            f"column_indices[{k}] = {int(column_indices[k])} then column_indices[{k + 1}] = "
            f"{int(column_indices[k + 1])} in block row {int(key[k]) // block_cols}"
        )
    return (rows, cols), block


def _transposed_metadata(
    row_offsets: torch.Tensor, column_indices: torch.Tensor, block_rows: int, block_cols: int
) -> _Transposed:
    nnz = column_indices.numel()
    rows = _block_rows(row_offsets, nnz)
    # Keys are unique, so the order is the block-column-major order with rows ascending.
    order = torch.argsort(column_indices.long() * block_rows + rows)
    counts = torch.bincount(column_indices, minlength=block_cols)
    offsets = torch.zeros(block_cols + 1, dtype=INDEX_DTYPE, device=row_offsets.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, rows[order].to(INDEX_DTYPE), order.to(INDEX_DTYPE)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order.long()] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inverse


def nonzero_blocks(dense: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Bool ``[rows / bm, cols / bn]``: which ``(bm, bn)`` blocks of the 2-D ``dense``
    hold a nonzero (NaN counts as one). Block sizes must divide the shape."""
    bm, bn = block
    tiles = dense.reshape(dense.shape[0] // bm, bm, dense.shape[1] // bn, bn)
    # One reduction pass (3x faster than chained any() over the strided block axes).
    return tiles.abs().amax(dim=(1, 3)) != 0


class BlockSparseMatrix:
    """A ``[rows, cols]`` matrix stored as its kept ``bm x bn`` blocks (BSR).

    Build one with :meth:`from_dense`, :meth:`from_block_mask` or
    :meth:`from_torch_sparse_bsr`, or directly from ``values`` ``[nnz_blocks, bm, bn]``,
    int32 ``row_offsets`` ``[rows / bm + 1]`` and int32 ``column_indices``
    ``[nnz_blocks]`` (see the module docstring). The fields cannot be reassigned; the
    transposed metadata is derived at construction and never taken from the caller, so it
    always agrees with the validated fields.
    """

    __slots__ = (
        "block",
        "column_indices",
        "row_offsets",
        "shape",
        "transpose_block_order",
        "transpose_column_indices",
        "transpose_row_offsets",
        "values",
    )

    values: torch.Tensor
    row_offsets: torch.Tensor
    column_indices: torch.Tensor
    transpose_row_offsets: torch.Tensor
    transpose_column_indices: torch.Tensor
    transpose_block_order: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    def __init__(
        self,
        values: torch.Tensor,
        row_offsets: torch.Tensor,
        column_indices: torch.Tensor,
        shape: tuple[int, int],
    ) -> None:
        self._assign(values, row_offsets, column_indices, shape, transposed=None)

    def _assign(
        self,
        values: torch.Tensor,
        row_offsets: torch.Tensor,
        column_indices: torch.Tensor,
        shape: tuple[int, int],
        transposed: _Transposed | None,
    ) -> None:
        """Validate and set the fields; ``transposed`` is passed only by methods that
        derived it from an already validated matrix."""
        shape, block = _validate(values, row_offsets, column_indices, shape)
        if transposed is None:
            transposed = _transposed_metadata(row_offsets, column_indices, shape[0] // block[0], shape[1] // block[1])
        fields = {
            "values": values,
            "row_offsets": row_offsets,
            "column_indices": column_indices,
            "transpose_row_offsets": transposed[0],
            "transpose_column_indices": transposed[1],
            "transpose_block_order": transposed[2],
            "shape": shape,
            "block": block,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BlockSparseMatrix is immutable; cannot set {name!r} (build a new matrix instead)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"BlockSparseMatrix is immutable; cannot delete {name!r}")

    @classmethod
    def _derived(
        cls,
        values: torch.Tensor,
        row_offsets: torch.Tensor,
        column_indices: torch.Tensor,
        shape: tuple[int, int],
        transposed: _Transposed,
    ) -> BlockSparseMatrix:
        matrix = cls.__new__(cls)
        matrix._assign(values, row_offsets, column_indices, shape, transposed)
        return matrix

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block: tuple[int, int]) -> BlockSparseMatrix:
        """Keep every ``block = (bm, bn)`` block of ``dense`` ``[rows, cols]`` that has a
        nonzero (NaN counts as nonzero)."""
        dense = _check_tensor(dense, "dense", VALUE_DTYPES, 2)
        shape = _check_shape(tuple(dense.shape), "dense.shape")
        bm, bn = _check_block(block, shape, "block")
        return cls.from_block_mask(dense, (bm, bn), nonzero_blocks(dense, (bm, bn)))

    @classmethod
    def from_block_mask(
        cls, dense: torch.Tensor, block: tuple[int, int], block_mask: torch.Tensor
    ) -> BlockSparseMatrix:
        """Keep the ``block = (bm, bn)`` blocks of ``dense`` ``[rows, cols]`` that the bool
        ``block_mask`` ``[rows / bm, cols / bn]`` selects, all-zero blocks included.

        ``block`` is explicit (not inferred from the two shapes) so that a mask of the
        wrong granularity, such as an element mask, is an error rather than 1x1 blocks.
        """
        dense = _check_tensor(dense, "dense", VALUE_DTYPES, 2)
        shape = _check_shape(tuple(dense.shape), "dense.shape")
        bm, bn = _check_block(block, shape, "block")
        grid = (shape[0] // bm, shape[1] // bn)
        block_mask = _check_tensor(block_mask, "block_mask", (torch.bool,), 2)
        if tuple(block_mask.shape) != grid:
            raise ValueError(
                f"block_mask must have shape [rows / bm, cols / bn] = {list(grid)} for dense "
                f"{list(shape)} and block {[bm, bn]}, got {list(block_mask.shape)}"
            )
        if block_mask.device != dense.device:
            raise ValueError(f"block_mask is on {block_mask.device}, dense on {dense.device}")
        # nonzero() is row-major, hence already sorted by block row then block column.
        rows, columns = block_mask.nonzero(as_tuple=True)
        tiles = dense.reshape(grid[0], bm, grid[1], bn)
        values = tiles[rows, :, columns, :].contiguous()  # [nnz, bm, bn]
        row_offsets = torch.zeros(grid[0] + 1, dtype=INDEX_DTYPE, device=dense.device)
        row_offsets[1:] = block_mask.sum(dim=1).cumsum(0)
        return cls(values, row_offsets, columns.to(INDEX_DTYPE), shape)

    @classmethod
    def from_torch_sparse_bsr(cls, tensor: torch.Tensor) -> BlockSparseMatrix:
        """Adopt a 2-D ``torch.sparse_bsr`` tensor (no batch or dense dimensions); its
        int64 indices are narrowed to int32, its values shared when already contiguous."""
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_bsr:
            got = tensor.layout if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"tensor must be a torch.sparse_bsr tensor, got {got}")
        if tensor.dim() != 2 or tensor.values().dim() != 3:
            raise ValueError(
                f"tensor must be a 2-D BSR matrix without batch or dense dimensions, got shape "
                f"{list(tensor.shape)} with values of shape {list(tensor.values().shape)}"
            )
        crow, col = tensor.crow_indices(), tensor.col_indices()
        if tensor.values().shape[0] > _INT32_MAX:
            raise ValueError(f"tensor has {tensor.values().shape[0]} blocks, more than int32 indices can address")
        return cls(
            tensor.values().contiguous(),
            crow.to(INDEX_DTYPE).contiguous(),
            col.to(INDEX_DTYPE).contiguous(),
            tuple(tensor.shape),
        )

    # ----------------------------------------------------------------- properties

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the ``rows / bm * cols / bn`` blocks that are stored."""
        return self.nnz_blocks / ((self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz_blocks}, "
            f"density={self.density:.4g}, dtype={self.dtype}, device={self.device})"
        )

    # ----------------------------------------------------------------- conversions

    def block_mask(self) -> torch.Tensor:
        """bool ``[rows / bm, cols / bn]``: which blocks are stored."""
        grid = (self.shape[0] // self.block[0], self.shape[1] // self.block[1])
        mask = torch.zeros(grid, dtype=torch.bool, device=self.device)
        mask[_block_rows(self.row_offsets, self.nnz_blocks), self.column_indices.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """``[rows, cols]`` in the values' dtype, zeros outside the stored blocks."""
        (rows, cols), (bm, bn) = self.shape, self.block
        tiles = torch.zeros(rows // bm, bm, cols // bn, bn, dtype=self.dtype, device=self.device)
        tiles[_block_rows(self.row_offsets, self.nnz_blocks), :, self.column_indices.long(), :] = self.values
        return tiles.reshape(rows, cols)

    def to_torch_sparse_bsr(self) -> torch.Tensor:
        """The same matrix as a ``torch.sparse_bsr`` tensor sharing ``values`` and the
        int32 index tensors (torch accepts int32 as long as both index tensors agree)."""
        # The invariants were checked at construction; checking again would cost a sync.
        return torch.sparse_bsr_tensor(
            self.row_offsets, self.column_indices, self.values, size=self.shape, check_invariants=False
        )

    def transpose(self) -> BlockSparseMatrix:
        """The ``[cols, rows]`` transpose with ``[nnz_blocks, bn, bm]`` blocks.

        The metadata is swapped with the precomputed transposed metadata (no sort); only
        the values are gathered into block-column order and transposed.
        """
        values = self.values[self.transpose_block_order.long()].transpose(1, 2).contiguous()
        return BlockSparseMatrix._derived(
            values,
            self.transpose_row_offsets,
            self.transpose_column_indices,
            (self.shape[1], self.shape[0]),
            transposed=(self.row_offsets, self.column_indices, _inverse_permutation(self.transpose_block_order)),
        )

    def to(self, dtype: torch.dtype) -> BlockSparseMatrix:
        """The same structure with values cast to ``dtype`` (one of :data:`VALUE_DTYPES`);
        ``self`` when the dtype already matches, as ``Tensor.to`` does."""
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype must be {' or '.join(map(str, VALUE_DTYPES))}, got {dtype}")
        if dtype == self.dtype:
            return self
        transposed = (self.transpose_row_offsets, self.transpose_column_indices, self.transpose_block_order)
        return BlockSparseMatrix._derived(
            self.values.to(dtype), self.row_offsets, self.column_indices, self.shape, transposed
        )
