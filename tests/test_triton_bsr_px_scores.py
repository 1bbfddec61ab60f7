"""The Triton bsr_px_scores kernel (``|grad_out^T inputs| * W**2`` at the stored blocks)
against the float64 dense product, and how the op chooses its backend.

As in test_triton_bsr_dense_mm, every score test forces ``backend="triton"``: GPU
tensors on a GPU machine, CPU tensors through Triton's interpreter elsewhere, where the
single autotuning config splits 128-wide blocks into 64 x 64 tiles and steps over the
rows 32 at a time (partial last step for R = 37).
"""

import importlib

import pytest
import torch
from test_triton_bsr_dense_mm import (
    BACKEND_OVERRIDES,
    BLOCK_IDS,
    BLOCKS,
    DEVICE,
    DTYPES,
    HALF_REJECTING_BACKENDS,
    bsr_operand,
    random_tensor,
    spy_on_triton_op,
)

from pxkern.ops.bsr_px_scores import bsr_px_scores
from pxkern.testing import assert_matches_float64

# (atol, rtol) against float64. Scores come out in float32 for float16/bfloat16 inputs,
# whose products are exact in float32: every dtype but float64 has float32's error, sums
# of up to 37 products of N(0, 1) values times a squared weight (scores reach ~200).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-10)}
SCORE_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                torch.float32: torch.float32, torch.float64: torch.float64}


def expected_scores(fields, grad_out, inputs):
    """``|grad_out^T inputs| * W**2`` at the stored blocks, from the dense float64
    product, block by block in the order of ``values``."""
    values, row_offsets, column_indices, _ = (f.cpu() if isinstance(f, torch.Tensor) else f
                                              for f in fields)
    _, bm, bn = values.shape
    product = grad_out.double().cpu().reshape(-1, grad_out.shape[-1]).T @ \
        inputs.double().cpu().reshape(-1, inputs.shape[-1])
    blocks = [
        product[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
        for i in range(len(row_offsets) - 1)
        for j in column_indices[row_offsets[i]:row_offsets[i + 1]].tolist()
    ]
    stored = torch.stack(blocks) if blocks else values.new_zeros(values.shape, dtype=torch.float64)
    return stored.abs() * values.double() ** 2


def assert_scores_match(actual, fields, grad_out, inputs, context):
    dtype = SCORE_DTYPES[fields[0].dtype]
    assert_matches_float64(actual.cpu(), expected_scores(fields, grad_out, inputs), dtype,
                           TOLERANCES[dtype], context)


@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("pattern", ["random", "full"])
@pytest.mark.parametrize("block,shape", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_match_float64(dtype, block, shape, pattern, rows):
    fields, _ = bsr_operand(shape, block, pattern, dtype)
    grad_out = random_tensor(rows, shape[0], dtype=dtype, seed=4)
    inputs = random_tensor(rows, shape[1], dtype=dtype, seed=5)
    actual = bsr_px_scores(*fields, grad_out, inputs, backend="triton")
    assert_scores_match(actual, fields, grad_out, inputs,
                        f"bsr_px_scores {shape} block={block} {pattern} R={rows}")


def test_leading_dims_and_strided_rows():
    fields, _ = bsr_operand((48, 80), (16, 16), "random", torch.float32)
    grad_out = random_tensor(3, 4, 48, dtype=torch.float32, seed=4)
    inputs = random_tensor(160, 12, dtype=torch.float32, seed=5).t()[:, ::2].reshape(12, 80)
    actual = bsr_px_scores(*fields, grad_out.reshape(12, 48), inputs, backend="triton")
    assert_scores_match(actual, fields, grad_out, inputs, "strided inputs")
    leading = bsr_px_scores(*fields, grad_out, inputs.reshape(3, 4, 80), backend="triton")
    assert torch.equal(leading, actual)


def test_unsorted_and_duplicate_blocks():
    # The kernel takes any order: block row 0 holds columns 2, 0; block row 1 holds 1 twice.
    values = random_tensor(4, 16, 16, dtype=torch.float64, seed=6)
    fields = (values, torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE),
              torch.tensor([2, 0, 1, 1], dtype=torch.int32, device=DEVICE), (32, 48))
    grad_out = random_tensor(5, 32, dtype=torch.float64, seed=7)
    inputs = random_tensor(5, 48, dtype=torch.float64, seed=8)
    actual = bsr_px_scores(*fields, grad_out, inputs, backend="triton")
    assert_scores_match(actual, fields, grad_out, inputs, "unsorted/duplicate blocks")


def test_no_rows_and_no_blocks():
    fields, _ = bsr_operand((48, 80), (16, 16), "full", torch.float16)
    no_rows = (torch.zeros(0, 48, dtype=torch.float16, device=DEVICE),
               torch.zeros(0, 80, dtype=torch.float16, device=DEVICE))
    scores = bsr_px_scores(*fields, *no_rows, backend="triton")
    assert torch.equal(scores, torch.zeros(fields[0].shape, device=DEVICE))
    fields, _ = bsr_operand((48, 80), (16, 16), "zero", torch.float32)
    rows = (torch.ones(2, 48, device=DEVICE), torch.ones(2, 80, device=DEVICE))
    scores = bsr_px_scores(*fields, *rows, backend="triton")
    assert scores.shape == (0, 16, 16)


def test_opcheck():
    # Schema, fake and autograd registration; the interpreter cannot run under
    # torch.compile's tracing (aot_dispatch).
    importlib.import_module("pxkern.kernels.triton.bsr_px_scores")  # registers the op
    fields, _ = bsr_operand((48, 80), (16, 16), "random", torch.float16)
    grad_out = random_tensor(5, 48, dtype=torch.float16, seed=4)
    inputs = random_tensor(5, 80, dtype=torch.float16, seed=5)
    torch.library.opcheck(
        torch.ops.pxkern.bsr_px_scores_triton.default,
        (*fields[:3], list(fields[3]), grad_out, inputs),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", HALF_REJECTING_BACKENDS)
def test_half_precision_needs_triton(dtype, backend):
    # CPU tensors: the C++ kernels run on the CPU only.
    values = torch.zeros(2, 16, 16, dtype=dtype)
    offsets = torch.tensor([0, 1, 2], dtype=torch.int32)
    columns = torch.tensor([0, 1], dtype=torch.int32)
    message = (
        f"bsr_px_scores: values must be float32 or float64 on the '{backend}' backend, got "
        rf"{dtype} \(float16 and bfloat16 need backend='triton'\)"
    )
    with pytest.raises(TypeError, match=message):
        bsr_px_scores(values, offsets, columns, (32, 32), torch.zeros(3, 32, dtype=dtype),
                      torch.zeros(3, 32, dtype=dtype), backend=backend)


def test_triton_block_sizes():
    fields, _ = bsr_operand((32, 32), (32, 8), "full", torch.float32)
    rows = (torch.zeros(3, 32, device=DEVICE), torch.zeros(3, 32, device=DEVICE))
    message = r"'triton' backend needs block sizes in \(16, 32, 64, 128\), got 32x8"
    with pytest.raises(ValueError, match=message):
        bsr_px_scores(*fields, *rows, backend="triton")


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@BACKEND_OVERRIDES
def test_backend_override(monkeypatch, environment, argument, runs_triton):
    calls = spy_on_triton_op(monkeypatch, "pxkern.kernels.triton.bsr_px_scores", "bsr_px_scores_triton")
    monkeypatch.setenv("PXKERN_BACKEND", environment)
    fields, _ = bsr_operand((48, 80), (16, 16), "random", torch.float32)
    grad_out = random_tensor(3, 48, dtype=torch.float32, seed=4)
    inputs = random_tensor(3, 80, dtype=torch.float32, seed=5)
    actual = bsr_px_scores(*fields, grad_out, inputs, backend=argument)
    assert len(calls) == int(runs_triton), f"PXKERN_BACKEND={environment} backend={argument}"
    assert_scores_match(actual, fields, grad_out, inputs, f"PXKERN_BACKEND={environment}")
