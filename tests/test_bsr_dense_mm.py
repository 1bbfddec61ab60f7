"""pxkern bsr_dense_mm / bsr_linear against dense products evaluated in float64."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.testing import assert_matches_float64
from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear

needs_extension = pytest.mark.skipif(
    not EXTENSION_AVAILABLE,
    reason="pxkern._C is not built (pip install --no-build-isolation -e .)",
)

# (atol, rtol) against the float64 reference; float32 sums of up to ~300 products.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
DTYPES = [torch.float32, torch.float64]
DENSITIES = (1.0, 0.3, 0.0)


def assert_close_to_reference(actual, expected, dtype, context: str) -> None:
    assert_matches_float64(actual, expected, dtype, TOLERANCES[dtype], context)


def random_bsr(m, k, bm, bn, density, dtype, seed=0):
    """A random W [m, k] keeping each bm x bn block with probability density: returns its
    BSR fields (values, row_offsets, column_indices) and the dense float64 W, built here
    block by block (independent of torch.sparse)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(m // bm, k // bn, generator=gen) < density
    dense = torch.zeros(m, k, dtype=torch.float64)
    blocks, offsets, columns = [], [0], []
    for i in range(m // bm):
        for j in range(k // bn):
            if keep[i, j]:
                block = torch.randn(bm, bn, generator=gen, dtype=torch.float64).to(dtype)
                blocks.append(block)
                columns.append(j)
                dense[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = block.double()
        offsets.append(len(columns))
    values = torch.stack(blocks) if blocks else torch.zeros(0, bm, bn, dtype=dtype)
    return (
        values,
        torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(columns, dtype=torch.int32),
        dense,
    )


def random_operands(m, k, n, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(m, generator=gen, dtype=torch.float64).to(dtype)
    return x, bias


def check_both_ops(m, k, n, bm, bn, density, dtype, with_bias, context):
    values, offsets, columns, dense = random_bsr(m, k, bm, bn, density, dtype)
    x, bias = random_operands(m, k, n, dtype)
    bias = bias if with_bias else None
    expected = dense @ x.double()
    if bias is not None:
        expected += bias.double()[:, None]
    actual = bsr_dense_mm(values, offsets, columns, (m, k), x, bias)
    assert_close_to_reference(actual, expected, dtype, f"bsr_dense_mm {context}")
    x_rows = x.t().contiguous()
    actual_linear = bsr_linear(values, offsets, columns, (m, k), x_rows, bias)
    assert_close_to_reference(actual_linear, expected.t(), dtype, f"bsr_linear {context}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bm,bn", [(16, 32), (32, 16), (8, 8), (16, 16), (32, 32), (64, 64),
                                   (8, 64), (64, 8)])
def test_matches_dense_odd_shape(isa, dtype, bm, bn):
    # M=96-ish, K=160-ish, N=37: N is not a multiple of the vector or packed panel width.
    m, k = (96 if 96 % bm == 0 else 128), (160 if 160 % bn == 0 else 192)
    for density, with_bias in itertools.product(DENSITIES, (True, False)):
        check_both_ops(m, k, 37, bm, bn, density, dtype, with_bias,
                       f"{m}x{k}@{k}x37 block={bm}x{bn} density={density} bias={with_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,n,bm,bn",
    [
        (96, 160, 1, 16, 32),     # one column: a single partial vector
        (64, 64, 7, 8, 8),        # narrower than one vector
        (64, 128, 200, 32, 32),   # several packed panels, partial last one
        (32, 64, 24, 32, 16),     # exactly one packed panel
        (32, 32, 5, 32, 32),      # one block row: regions are split between threads
        (24, 20, 13, 12, 4),      # block rows of 12, blocks narrower than a vector
    ],
)
def test_matches_dense_unusual_shapes(isa, dtype, m, k, n, bm, bn):
    for density in (1.0, 0.5):
        check_both_ops(m, k, n, bm, bn, density, dtype, True, f"{m}x{k}@{k}x{n} density={density}")


def test_zero_block_matrix_gives_bias(isa):
    values, offsets, columns, _ = random_bsr(64, 96, 16, 32, 0.0, torch.float32)
    assert values.shape[0] == 0
    x = torch.randn(96, 10)
    bias = torch.randn(64)
    assert torch.equal(bsr_dense_mm(values, offsets, columns, (64, 96), x, bias),
                       bias[:, None].expand(64, 10))
    assert torch.equal(bsr_dense_mm(values, offsets, columns, (64, 96), x), torch.zeros(64, 10))
    assert torch.equal(bsr_linear(values, offsets, columns, (64, 96), x.t(), bias),
                       bias.expand(10, 64))


def test_empty_block_rows_between_full_ones(isa):
    # Block rows 1 and 2 hold no blocks: their rows must be bias, not stale memory.
    values, offsets, columns, dense = random_bsr(64, 64, 16, 16, 1.0, torch.float64)
    keep_rows = [0, 3]
    kept = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in keep_rows])
    counts = [int(offsets[i + 1] - offsets[i]) if i in keep_rows else 0 for i in range(4)]
    new_offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
    dense[16:48] = 0
    x, bias = random_operands(64, 64, 19, torch.float64)
    expected = dense @ x + bias[:, None]
    actual = bsr_dense_mm(values[kept], new_offsets, columns[kept], (64, 64), x, bias)
    assert_close_to_reference(actual, expected, torch.float64, "empty block rows")


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_bsr_linear_batch_dims_and_torch_sparse_layout(isa):
    dense = torch.randn(48, 64) * (torch.rand(3, 1, 4, 1) < 0.5).expand(3, 16, 4, 16).reshape(48, 64)
    bsr = dense.to_sparse_bsr((16, 16))
    fields = (bsr.values(), bsr.crow_indices().int(), bsr.col_indices().int(), (48, 64))
    x = torch.randn(2, 5, 64)
    bias = torch.randn(48)
    expected = torch.nn.functional.linear(x.double(), dense.double(), bias.double())
    assert_close_to_reference(bsr_linear(*fields, x, bias), expected, torch.float32, "x [2, 5, K]")
    non_contiguous = torch.randn(64, 30)[:, ::3]
    assert_close_to_reference(bsr_dense_mm(*fields, non_contiguous), dense.double() @
                              non_contiguous.double(), torch.float32, "strided x")


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"values": torch.zeros(2, 16, 16).half()}, TypeError, "float32 or float64"),
        ({"row_offsets": torch.tensor([0, 1, 2], dtype=torch.int64)}, TypeError, "must be int32"),
        ({"x": torch.zeros(32, 8, dtype=torch.float64)}, TypeError, "must match values"),
        ({"values": torch.zeros(2, 16)}, ValueError, "values must be 3-D"),
        ({"shape": (32, 40)}, ValueError, "block size 16x16 does not divide shape"),
        ({"row_offsets": torch.tensor([0, 2], dtype=torch.int32)}, ValueError,
         r"row_offsets must have shape \[M / bm \+ 1\] = \[3\]"),
        ({"column_indices": torch.tensor([0], dtype=torch.int32)}, ValueError,
         "column_indices must have shape"),
        ({"x": torch.zeros(16, 8)}, ValueError, "x must be \\[K, N\\] with K = 32"),
        ({"bias": torch.zeros(31)}, ValueError, "bias must be \\[32\\]"),
    ],
)
def test_bad_input_python(kwargs, error, message):
    args = {
        "values": torch.zeros(2, 16, 16),
        "row_offsets": torch.tensor([0, 1, 2], dtype=torch.int32),
        "column_indices": torch.tensor([0, 1], dtype=torch.int32),
        "shape": (32, 32),
        "x": torch.zeros(32, 8),
        "bias": None,
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        bsr_dense_mm(**args)


@needs_extension
@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"values": torch.zeros(2, 16, 16, dtype=torch.int32)}, "values must be float32 or float64"),
        ({"x": torch.zeros(32, 32, dtype=torch.float64)}, "x dtype Double must match values dtype Float"),
        ({"row_offsets": torch.tensor([0, 1, 2])}, "must be int32"),
        ({"values": torch.zeros(2, 16, 32)[:, :, :16]}, "must be contiguous"),
        ({"shape": [32, 40]}, "block size 16x16 does not divide shape"),
        ({"row_offsets": torch.tensor([0, 2], dtype=torch.int32)}, "M / bm \\+ 1 = 3 entries"),
        ({"column_indices": torch.tensor([0], dtype=torch.int32)}, "column_indices has 1 entries"),
        ({"row_offsets": torch.tensor([0, 2, 1], dtype=torch.int32)}, "row_offsets\\[-1\\] must equal"),
        ({"row_offsets": torch.tensor([1, 1, 2], dtype=torch.int32)}, "row_offsets\\[0\\] must be 0"),
        ({"row_offsets": torch.tensor([0, 3, 2], dtype=torch.int32)},
         "row_offsets must be non-decreasing, but row_offsets\\[2\\] = 2 < row_offsets\\[1\\] = 3"),
        ({"column_indices": torch.tensor([0, 2], dtype=torch.int32)},
         "column_indices\\[1\\] = 2 is outside \\[0, 2\\)"),
        ({"x": torch.zeros(16, 16)}, "needs K = 32"),
        ({"bias": torch.zeros(16)}, "bias must have shape \\[32\\]"),
    ],
)
def test_bad_input_registered_op(op, kwargs, message):
    args = {
        "values": torch.zeros(2, 16, 16),
        "row_offsets": torch.tensor([0, 1, 2], dtype=torch.int32),
        "column_indices": torch.tensor([0, 1], dtype=torch.int32),
        "shape": [32, 32],
        "x": torch.zeros(32, 32),
        "bias": None,
    }
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.pxkern, op)(*args.values())


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square_weight", [False, True])
@pytest.mark.parametrize("m,k,bm,bn", [(96, 160, 16, 32), (64, 128, 32, 16), (128, 128, 64, 64)])
def test_bsr_linear_with_kept_transposed_blocks(isa, dtype, square_weight, m, k, bm, bn):
    """The blocks transposed by the caller (as BlockSparseLinear keeps them) give the
    product of W, not of whatever the kernel's own transposition would."""
    values, offsets, columns, dense = random_bsr(m, k, bm, bn, 0.4, dtype)
    x, bias = random_operands(m, k, 29, dtype)
    x_rows = x.t().contiguous()
    weight = dense.square() if square_weight else dense
    expected = x_rows.double() @ weight.t() + bias.double()
    blocks = values.transpose(1, 2).contiguous()
    actual = bsr_linear(values, offsets, columns, (m, k), x_rows, bias, square_weight, transposed_blocks=blocks)
    assert_close_to_reference(actual, expected, dtype, f"bsr_linear {m}x{k} block={bm}x{bn} kept blocks")


@needs_extension
@pytest.mark.parametrize(
    "blocks, message",
    [
        (torch.zeros(2, 16, 32), "transposed_blocks must have shape \\[nnz_blocks, bn, bm\\] = \\[2, 16, 16\\]"),
        (torch.zeros(2, 16, 16, dtype=torch.float64), "transposed_blocks must be a CPU tensor of dtype Float"),
        (torch.zeros(2, 16, 32)[:, :, :16], "transposed_blocks must be contiguous"),
    ],
)
def test_bad_transposed_blocks(blocks, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pxkern.bsr_linear(torch.zeros(2, 16, 16), torch.tensor([0, 1, 2], dtype=torch.int32),
                                    torch.tensor([0, 1], dtype=torch.int32), [32, 32], torch.zeros(3, 32),
                                    None, False, blocks)


@needs_extension
@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(op, with_bias):
    values, offsets, columns, _ = random_bsr(64, 96, 16, 32, 0.4, torch.float32)
    x, bias = random_operands(64, 96, 11, torch.float32)
    x = x if op == "bsr_dense_mm" else x.t().contiguous()
    args = (values, offsets, columns, [64, 96], x, bias if with_bias else None)
    torch.library.opcheck(getattr(torch.ops.pxkern, op).default, args)
    if op == "bsr_linear":
        blocks = values.transpose(1, 2).contiguous()
        torch.library.opcheck(torch.ops.pxkern.bsr_linear.default, (*args, False, blocks))


def test_pure_pytorch_fallback_when_disabled():
    code = (
        "import torch\n"
        "from pxkern._extension import EXTENSION_AVAILABLE\n"
        "from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear\n"
        "assert not EXTENSION_AVAILABLE\n"
        "w = torch.randn(32, 64) * torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(16, 0)"
        ".repeat_interleave(32, 1)\n"
        "bsr = w.to_sparse_bsr((16, 32))\n"
        "fields = (bsr.values(), bsr.crow_indices().int(), bsr.col_indices().int(), (32, 64))\n"
        "x, b = torch.randn(64, 5), torch.randn(32)\n"
        "torch.testing.assert_close(bsr_dense_mm(*fields, x, b), w @ x + b[:, None])\n"
        "torch.testing.assert_close(bsr_linear(*fields, x.t(), b), x.t() @ w.t() + b)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PXKERN_DISABLE_EXTENSION": "1"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _differentiable_product(op: str, backend: str, square_weight: bool, kept_blocks: bool = False):
    """A small float64 product with its inputs (values, x, bias) requiring grad;
    kept_blocks: bsr_linear is also given the transposed blocks, made from values."""
    from pxkern.sparse.format import BlockSparseMatrix

    generator = torch.Generator().manual_seed(0)
    blocks = torch.tensor([[True, False, True], [False, True, True]])
    dense = torch.randn(32, 48, dtype=torch.float64, generator=generator)
    dense = dense * blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    matrix = BlockSparseMatrix.from_dense(dense, (16, 16))
    values = matrix.values.clone().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, generator=generator).requires_grad_()
    if op == "bsr_linear":
        x = torch.randn(2, 3, 48, dtype=torch.float64, generator=generator).requires_grad_()
        function = bsr_linear
    else:
        x = torch.randn(48, 5, dtype=torch.float64, generator=generator).requires_grad_()
        function = bsr_dense_mm

    def product(values, x, bias):
        extra = {"transposed_blocks": values.transpose(1, 2).contiguous()} if kept_blocks else {}
        return function(values, matrix.row_offsets, matrix.column_indices, [32, 48], x, bias,
                        square_weight, backend=backend, **extra)

    return product, (values, x, bias)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("square_weight", [False, True])
@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
def test_gradients_match_finite_differences(op, square_weight, backend):
    """Autograd of the C++ and PyTorch backends: float64 gradcheck in values, x and bias."""
    if backend == "cpp" and not EXTENSION_AVAILABLE:
        pytest.skip("the C++ backend needs the pxkern._C extension")
    product, inputs = _differentiable_product(op, backend, square_weight)
    assert torch.autograd.gradcheck(product, inputs)


@needs_extension
@pytest.mark.parametrize("square_weight", [False, True])
def test_bsr_linear_gradients_with_kept_transposed_blocks(square_weight):
    product, inputs = _differentiable_product("bsr_linear", "cpp", square_weight, kept_blocks=True)
    assert torch.autograd.gradcheck(product, inputs)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("square_weight", [False, True])
@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
def test_triton_gradients_equal_the_checked_ones(op, square_weight):
    """The Triton backend's backward (one call under the interpreter; gradcheck's many
    evaluations would take minutes there) against the gradchecked PyTorch backend's."""
    grads = {}
    for backend in ("triton", "torch"):
        product, inputs = _differentiable_product(op, backend, square_weight)
        output = product(*inputs)
        cotangent = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(1))
        grads[backend] = torch.autograd.grad(output, inputs, cotangent)
    for name, got, expected in zip(("values", "x", "bias"), grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
