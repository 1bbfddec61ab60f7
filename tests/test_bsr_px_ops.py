"""The PX variants of the block-sparse products against float64 dense references:
bsr_dense_mm / bsr_linear with square_weight=True (stream C, W∘W) and bsr_px_scores
(|grad_out^T inputs| * W^2 at the stored blocks)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_bsr_dense_mm import DENSITIES, DTYPES, assert_close_to_reference, needs_extension, random_bsr

from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear
from pxkern.ops.bsr_px_scores import bsr_px_scores

# Square blocks of 8/16/32, rectangular ones, and blocks narrower than a float32 vector.
BLOCKS = [(8, 8), (16, 16), (32, 32), (16, 32), (32, 8), (12, 4)]


def odd_shape(bm, bn):
    """An M x K made of 3 x 5 blocks (e.g. 48 x 80 for 16 x 16 blocks)."""
    return 3 * bm, 5 * bn


def random_rows(rows, cols, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)


def stored_blocks(dense, row_offsets, column_indices, bm, bn):
    """The blocks of a dense [M, K] tensor at the stored positions, [nnz_blocks, bm, bn]."""
    blocks = []
    for i in range(len(row_offsets) - 1):
        for p in range(int(row_offsets[i]), int(row_offsets[i + 1])):
            j = int(column_indices[p])
            blocks.append(dense[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn])
    return torch.stack(blocks) if blocks else dense.new_zeros(0, bm, bn)


def expected_scores(values, row_offsets, column_indices, grad_out, inputs):
    """|grad_out^T inputs| * W^2 at the stored blocks, in float64 from the dense product."""
    _, bm, bn = values.shape
    product = grad_out.double().T @ inputs.double()
    return stored_blocks(product, row_offsets, column_indices, bm, bn).abs() * values.double() ** 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bm,bn", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n", [1, 5, 37])
@pytest.mark.usefixtures("isa")
def test_square_weight_matches_dense(dtype, bm, bn, density, n):
    m, k = odd_shape(bm, bn)
    values, offsets, columns, dense = random_bsr(m, k, bm, bn, density, dtype)
    x = random_rows(k, n, dtype, seed=1)
    bias = random_rows(1, m, dtype, seed=2)[0]
    fields = (values, offsets, columns, (m, k))
    context = f"{m}x{k} block={bm}x{bn} density={density} n={n}"
    for with_bias in (True, False):
        b = bias if with_bias else None
        expected = (dense**2) @ x.double() + (bias.double()[:, None] if with_bias else 0.0)
        actual = bsr_dense_mm(*fields, x, b, square_weight=True)
        assert_close_to_reference(actual, expected, dtype, f"bsr_dense_mm squared {context}")
        x_rows = x.t().contiguous()
        expected_linear = F.linear(x_rows.double(), dense**2, b.double() if with_bias else None)
        actual_linear = bsr_linear(*fields, x_rows, b, square_weight=True)
        assert_close_to_reference(actual_linear, expected_linear, dtype,
                                  f"bsr_linear squared {context}")


@pytest.mark.usefixtures("isa")
def test_square_weight_false_is_the_plain_product():
    values, offsets, columns, dense = random_bsr(64, 96, 16, 32, 0.5, torch.float64)
    x = random_rows(96, 9, torch.float64, seed=1)
    fields = (values, offsets, columns, (64, 96))
    assert torch.equal(bsr_dense_mm(*fields, x, square_weight=False), bsr_dense_mm(*fields, x))
    assert_close_to_reference(bsr_linear(*fields, x.t(), square_weight=False), x.t() @ dense.t(),
                              torch.float64, "bsr_linear square_weight=False")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bm,bn", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.usefixtures("isa")
def test_scores_match_dense(dtype, bm, bn, density, batch):
    m, k = odd_shape(bm, bn)
    values, offsets, columns, _ = random_bsr(m, k, bm, bn, density, dtype)
    grad_out = random_rows(batch, m, dtype, seed=3)
    inputs = random_rows(batch, k, dtype, seed=4)
    actual = bsr_px_scores(values, offsets, columns, (m, k), grad_out, inputs)
    assert_close_to_reference(actual, expected_scores(values, offsets, columns, grad_out, inputs),
                              dtype, f"bsr_px_scores {m}x{k} block={bm}x{bn} density={density} "
                              f"B={batch}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bm,bn", [(32, 32), (8, 8), (16, 32)])
@pytest.mark.usefixtures("isa")
def test_scores_large_batch_in_chunks(dtype, bm, bn):
    # B = 300 exceeds the batch chunk of the kernel (~100-200 rows): partial sums are
    # stored and reloaded between chunks, the epilogue runs once.
    m, k = odd_shape(bm, bn)
    values, offsets, columns, _ = random_bsr(m, k, bm, bn, 0.6, dtype)
    grad_out = random_rows(300, m, dtype, seed=5) / 10
    inputs = random_rows(300, k, dtype, seed=6) / 10
    actual = bsr_px_scores(values, offsets, columns, (m, k), grad_out, inputs)
    expected = expected_scores(values, offsets, columns, grad_out, inputs)
    if dtype == torch.float32:
        # Sums of 300 products: compare with the float32 rounding they allow.
        torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-4)
    else:
        assert_close_to_reference(actual, expected, dtype, f"B=300 block={bm}x{bn}")


@pytest.mark.usefixtures("isa")
def test_scores_leading_dims_unsorted_and_duplicate_blocks():
    # Block row 0 holds columns 2, 0 (unsorted); block row 1 holds column 1 twice.
    values = random_rows(4 * 16, 16, torch.float64, seed=7).reshape(4, 16, 16)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    columns = torch.tensor([2, 0, 1, 1], dtype=torch.int32)
    grad_out = random_rows(6, 32, torch.float64, seed=8).reshape(2, 3, 32)
    inputs = random_rows(6, 48, torch.float64, seed=9).reshape(2, 3, 48)
    actual = bsr_px_scores(values, offsets, columns, (32, 48), grad_out, inputs)
    expected = expected_scores(values, offsets, columns, grad_out.reshape(6, 32),
                               inputs.reshape(6, 48))
    assert_close_to_reference(actual, expected, torch.float64, "unsorted/duplicate blocks")


@pytest.mark.usefixtures("isa")
def test_scores_empty_batch_and_no_blocks():
    values, offsets, columns, _ = random_bsr(32, 64, 16, 32, 1.0, torch.float32)
    scores = bsr_px_scores(values, offsets, columns, (32, 64), torch.zeros(0, 32),
                           torch.zeros(0, 64))
    assert torch.equal(scores, torch.zeros_like(values))
    values, offsets, columns, _ = random_bsr(32, 64, 16, 32, 0.0, torch.float32)
    scores = bsr_px_scores(values, offsets, columns, (32, 64), torch.ones(2, 32), torch.ones(2, 64))
    assert scores.shape == (0, 16, 32)


@pytest.mark.usefixtures("isa")
def test_scores_are_px_scores_of_a_linear_layer():
    # The op's contract: for y = x @ (W∘W)^T and a loss L(y), the PX score of the stored
    # weights is |dL/d(W∘W)| * W^2 = |grad_out^T x| * W^2.
    values, offsets, columns, dense = random_bsr(48, 64, 16, 16, 0.5, torch.float64)
    squared = (dense**2).requires_grad_()
    x = random_rows(4, 64, torch.float64, seed=10)
    y = F.linear(x, squared)
    grad_out = torch.ones_like(y)
    y.backward(grad_out)
    expected = stored_blocks(squared.grad.abs() * dense**2, offsets, columns, 16, 16)
    actual = bsr_px_scores(values, offsets, columns, (48, 64), grad_out, x)
    assert_close_to_reference(actual, expected, torch.float64, "autograd PX score")


def score_arguments(**overrides):
    """Valid bsr_px_scores arguments (W 32 x 32 in two 16 x 16 blocks, B = 3), in schema
    order, with some replaced."""
    args = {
        "values": torch.zeros(2, 16, 16),
        "row_offsets": torch.tensor([0, 1, 2], dtype=torch.int32),
        "column_indices": torch.tensor([0, 1], dtype=torch.int32),
        "shape": [32, 32],
        "grad_out": torch.zeros(3, 32),
        "inputs": torch.zeros(3, 32),
    }
    return {**args, **overrides}


BAD_SCORE_INPUTS = [
    ({"values": torch.zeros(2, 16, 16).half()}, TypeError, "float32 or float64"),
    ({"column_indices": torch.tensor([0, 1])}, TypeError, "must be int32"),
    ({"grad_out": torch.zeros(3, 32, dtype=torch.float64)}, TypeError, "must match values"),
    ({"shape": (32, 40)}, ValueError, "block size 16x16 does not divide shape"),
    ({"grad_out": torch.zeros(3, 16)}, ValueError, r"grad_out must be \[\.\.\., M\] with M = 32"),
    ({"inputs": torch.zeros(3, 16)}, ValueError, r"inputs must be \[\.\.\., K\] with K = 32"),
    ({"inputs": torch.zeros(4, 32)}, ValueError, "must have the same leading dimensions"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_SCORE_INPUTS)
def test_scores_bad_input_python(kwargs, error, message):
    with pytest.raises(error, match=message):
        bsr_px_scores(**score_arguments(**kwargs))


@pytest.mark.parametrize("op", [bsr_dense_mm, bsr_linear])
def test_square_weight_must_be_bool(op):
    fields = (torch.zeros(2, 16, 16), torch.tensor([0, 1, 2], dtype=torch.int32),
              torch.tensor([0, 1], dtype=torch.int32), (32, 32))
    with pytest.raises(TypeError, match="square_weight must be a bool, got int"):
        op(*fields, torch.zeros(32, 32), None, 1)


@needs_extension
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"values": torch.zeros(2, 16, 16, dtype=torch.int32)},
         "values must be float32 or float64"),
        ({"inputs": torch.zeros(3, 32, dtype=torch.float64)},
         "inputs dtype Double must match values dtype Float"),
        ({"grad_out": torch.zeros(3, 32, dtype=torch.float64)},
         "grad_out dtype Double must match values dtype Float"),
        ({"grad_out": torch.zeros(32, 6)[:, ::2]}, "grad_out must be contiguous"),
        ({"inputs": torch.zeros(32, 6)[:, ::2]}, "inputs must be contiguous"),
        ({"grad_out": torch.zeros(3, 32, 1)}, r"grad_out must be 2-D \[B, M\]"),
        ({"inputs": torch.zeros(3, 16)}, "inputs has 16 columns but W of shape .* needs K = 32"),
        ({"grad_out": torch.zeros(3, 16)},
         "grad_out has 16 columns but W of shape .* needs M = 32"),
        ({"grad_out": torch.zeros(4, 32)}, "same number of rows B, got 4 and 3"),
        ({"row_offsets": torch.tensor([0, 3, 2], dtype=torch.int32)}, "non-decreasing"),
        ({"column_indices": torch.tensor([0, 2], dtype=torch.int32)},
         r"column_indices\[1\] = 2 is outside \[0, 2\)"),
    ],
)
def test_scores_bad_input_registered_op(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pxkern.bsr_px_scores(*score_arguments(**kwargs).values())


@needs_extension
@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_square_weight(op, with_bias):
    values, offsets, columns, _ = random_bsr(64, 96, 16, 32, 0.4, torch.float32)
    x = random_rows(96, 11, torch.float32, seed=1)
    x = x if op == "bsr_dense_mm" else x.t().contiguous()
    bias = random_rows(1, 64, torch.float32, seed=2)[0] if with_bias else None
    torch.library.opcheck(
        getattr(torch.ops.pxkern, op).default, (values, offsets, columns, [64, 96], x, bias, True)
    )


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_scores(dtype):
    values, offsets, columns, _ = random_bsr(64, 96, 16, 32, 0.4, dtype)
    grad_out = random_rows(5, 64, dtype, seed=3)
    inputs = random_rows(5, 96, dtype, seed=4)
    torch.library.opcheck(
        torch.ops.pxkern.bsr_px_scores.default,
        (values, offsets, columns, [64, 96], grad_out, inputs),
    )


def test_pure_pytorch_fallback_when_disabled():
    code = (
        "import torch\n"
        "from pxkern._extension import EXTENSION_AVAILABLE\n"
        "from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear\n"
        "from pxkern.ops.bsr_px_scores import bsr_px_scores\n"
        "assert not EXTENSION_AVAILABLE\n"
        "mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).repeat_interleave(16, 0)"
        ".repeat_interleave(32, 1)\n"
        "w = torch.randn(32, 64, dtype=torch.float64) * mask\n"
        "bsr = w.to_sparse_bsr((16, 32))\n"
        "fields = (bsr.values(), bsr.crow_indices().int(), bsr.col_indices().int(), (32, 64))\n"
        "x, b = torch.randn(64, 5, dtype=torch.float64), torch.randn(32, dtype=torch.float64)\n"
        "torch.testing.assert_close(bsr_dense_mm(*fields, x, b, True), w**2 @ x + b[:, None])\n"
        "torch.testing.assert_close(bsr_linear(*fields, x.t(), b, True), x.t() @ (w**2).t() + b)\n"
        "g = torch.randn(5, 32, dtype=torch.float64)\n"
        "s = ((g.t() @ x.t()).abs() * w**2 * mask).to_sparse_bsr((16, 32)).values()\n"
        "torch.testing.assert_close(bsr_px_scores(*fields, g, x.t()), s)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env={**os.environ, "PXKERN_DISABLE_EXTENSION": "1"},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
