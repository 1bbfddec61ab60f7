"""The Triton bsr_dense_mm / bsr_linear kernels against float64 dense products, and how
the ops choose their backend.

Every product test forces ``backend="triton"``: on a GPU machine the tensors live on the
GPU, elsewhere they stay on the CPU and Triton's interpreter runs the kernels (see
conftest), with a single autotuning config whose 64-wide tiles split the 128-wide
blocks in both directions and whose 32 columns leave a partial column tile.
"""

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_bsr_dense_mm import needs_extension

from pxkern.ops.bsr_dense_mm import bsr_dense_mm, bsr_linear
from pxkern.sparse.format import BlockSparseMatrix
from pxkern.testing import assert_matches_float64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (atol, rtol) against float64 products of the same (rounded) operands. Outputs reach
# ~100 (sums of up to 192 products of N(0, 1) values, squared or not); the result is
# rounded to its dtype (2**-11 relative for float16, 2**-9 for bfloat16), and on a GPU
# each squared weight is rounded to the dtype before a half-precision tl.dot.
TOLERANCES = {
    torch.float16: (5e-2, 4e-3),
    torch.bfloat16: (4e-1, 2e-2),
    torch.float32: (1e-4, 2e-5),
    torch.float64: (1e-10, 1e-10),
}
# (bm, bn) and the W [M, K] they tile: each size 16..128 for bm and for bn, square and
# rectangular blocks (both ways), odd block counts (48 x 80 is 3 x 5 blocks of 16).
BLOCKS = [
    ((16, 16), (48, 80)),
    ((32, 64), (64, 192)),
    ((64, 32), (128, 64)),
    ((128, 128), (256, 128)),
]
BLOCK_IDS = [f"{bm}x{bn}" for (bm, bn), _ in BLOCKS]
# The backends that have float32 and float64 only.
HALF_REJECTING_BACKENDS = [pytest.param("cpp", marks=needs_extension), "torch"]


def block_mask(pattern: str, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """bool ``grid``: which blocks are kept. "random" keeps about half, always the first
    block and never the last one, so every grid of two or more blocks gets a mix."""
    if pattern == "full":
        return torch.ones(grid, dtype=torch.bool)
    if pattern == "zero":
        return torch.zeros(grid, dtype=torch.bool)
    mask = torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[0, 0], mask[-1, -1] = True, False
    return mask


def bsr_operand(shape, block, pattern, dtype, seed=0):
    """A random ``W [M, K]`` keeping the blocks of ``pattern``: its BSR fields on DEVICE
    (``values, row_offsets, column_indices, shape``) and W in float64, built from the
    rounded values by masking, independently of the BSR conversion."""
    (m, k), (bm, bn) = shape, block
    mask = block_mask(pattern, (m // bm, k // bn), seed)
    elements = mask.repeat_interleave(bm, 0).repeat_interleave(bn, 1)
    gen = torch.Generator().manual_seed(seed + 1)
    dense = (torch.randn(m, k, generator=gen, dtype=torch.float64) * elements).to(dtype)
    matrix = BlockSparseMatrix.from_block_mask(dense.to(DEVICE), block, mask.to(DEVICE))
    fields = (matrix.values, matrix.row_offsets, matrix.column_indices, (m, k))
    return fields, dense.double()


def random_tensor(*shape, dtype, seed):
    """A ``shape`` tensor of N(0, 1) values on DEVICE, drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def expected_linear(dense, x, bias, square_weight):
    """``F.linear`` in float64 of the rounded operands, on the CPU."""
    weight = dense**2 if square_weight else dense
    return F.linear(x.double().cpu(), weight, None if bias is None else bias.double().cpu())


# Each op sees two of the four (bias, square_weight) pairs and the other op the other
# two: bsr_linear runs the same kernel as bsr_dense_mm, through transposed strides.
@pytest.mark.parametrize("with_bias,square_weight", [(False, False), (True, True)],
                         ids=["W", "WoW+bias"])
@pytest.mark.parametrize("pattern", ["random", "full"])
@pytest.mark.parametrize("block,shape", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsr_dense_mm_matches_float64(dtype, block, shape, pattern, with_bias, square_weight):
    fields, dense = bsr_operand(shape, block, pattern, dtype)
    x = random_tensor(shape[1], 19, dtype=dtype, seed=2)
    bias = random_tensor(shape[0], dtype=dtype, seed=3) if with_bias else None
    actual = bsr_dense_mm(*fields, x, bias, square_weight, backend="triton")
    expected = expected_linear(dense, x.t(), bias, square_weight).t()
    assert_matches_float64(
        actual.cpu(), expected, dtype, TOLERANCES[dtype],
        f"bsr_dense_mm {shape}@[{shape[1]}, 19] block={block} {pattern} bias={with_bias} "
        f"square_weight={square_weight}",
    )


@pytest.mark.parametrize("with_bias,square_weight", [(True, False), (False, True)],
                         ids=["W+bias", "WoW"])
@pytest.mark.parametrize("pattern", ["random", "full"])
@pytest.mark.parametrize("block,shape", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsr_linear_matches_float64(dtype, block, shape, pattern, with_bias, square_weight):
    fields, dense = bsr_operand(shape, block, pattern, dtype)
    x = random_tensor(37, shape[1], dtype=dtype, seed=2)
    bias = random_tensor(shape[0], dtype=dtype, seed=3) if with_bias else None
    actual = bsr_linear(*fields, x, bias, square_weight, backend="triton")
    assert_matches_float64(
        actual.cpu(), expected_linear(dense, x, bias, square_weight), dtype, TOLERANCES[dtype],
        f"bsr_linear [37, {shape[1]}]@{shape}^T block={block} {pattern} bias={with_bias} "
        f"square_weight={square_weight}",
    )


@pytest.mark.parametrize("block,shape", BLOCKS, ids=BLOCK_IDS)
def test_zero_blocks_give_the_bias(block, shape):
    fields, _ = bsr_operand(shape, block, "zero", torch.float32)
    assert fields[0].shape[0] == 0
    x = random_tensor(shape[1], 19, dtype=torch.float32, seed=2)
    bias = random_tensor(shape[0], dtype=torch.float32, seed=3)
    assert torch.equal(bsr_dense_mm(*fields, x, bias, True, backend="triton"),
                       bias[:, None].expand(-1, 19))
    assert torch.equal(bsr_linear(*fields, x.t(), None, backend="triton"),
                       torch.zeros(19, shape[0], device=DEVICE))


@pytest.mark.parametrize(
    "layout",
    ["strided_x", "x_transposed_view", "leading_dims", "one_column", "three_column_tiles"],
)
def test_layouts(layout):
    fields, dense = bsr_operand((48, 80), (16, 16), "random", torch.float32)
    bias = random_tensor(48, dtype=torch.float32, seed=3)
    columns = {"one_column": 1, "three_column_tiles": 70}.get(layout, 19)
    x = random_tensor(80, 2 * columns, dtype=torch.float32, seed=2)[:, ::2]  # [K, N], strided
    expected = expected_linear(dense, x.t(), bias, False)
    if layout == "x_transposed_view":
        actual = bsr_linear(*fields, x.t(), bias, backend="triton")  # rows of stride 2
    elif layout == "leading_dims":
        x = x[:, :18].t().reshape(2, 9, 80)
        actual = bsr_linear(*fields, x, bias, backend="triton")
        expected = expected_linear(dense, x, bias, False)
    else:
        actual = bsr_dense_mm(*fields, x, bias, backend="triton").t()
    assert_matches_float64(actual.cpu(), expected, torch.float32, TOLERANCES[torch.float32],
                           layout)


def test_no_columns():
    fields, _ = bsr_operand((48, 80), (16, 16), "full", torch.float32)
    y = bsr_dense_mm(*fields, torch.zeros(80, 0, device=DEVICE), backend="triton")
    assert y.shape == (48, 0)
    y = bsr_linear(*fields, torch.zeros(2, 0, 80, device=DEVICE), backend="triton")
    assert y.shape == (2, 0, 48)


@pytest.mark.parametrize("op", ["bsr_dense_mm", "bsr_linear"])
def test_opcheck(op):
    # The interpreter cannot run under torch.compile's tracing (aot_dispatch): schema,
    # fake and autograd registration only.
    importlib.import_module(f"pxkern.kernels.triton.{op}")  # registers pxkern::{op}_triton
    fields, _ = bsr_operand((48, 80), (16, 16), "random", torch.float32)
    x = random_tensor(80, 7, dtype=torch.float32, seed=2)
    x = x if op == "bsr_dense_mm" else x.t().contiguous()
    torch.library.opcheck(
        getattr(torch.ops.pxkern, f"{op}_triton").default,
        (*fields[:3], list(fields[3]), x, random_tensor(48, dtype=torch.float32, seed=3), True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("op", [bsr_dense_mm, bsr_linear], ids=lambda op: op.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", HALF_REJECTING_BACKENDS)
def test_half_precision_needs_triton(op, dtype, backend):
    # CPU tensors: the C++ kernels run on the CPU only.
    values = torch.zeros(4, 16, 16, dtype=dtype)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    columns = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    message = (
        f"values must be float32 or float64 on the '{backend}' backend, got {dtype} "
        r"\(float16 and bfloat16 need backend='triton'\)"
    )
    with pytest.raises(TypeError, match=message):
        op(values, offsets, columns, (32, 32), torch.zeros(32, 32, dtype=dtype), backend=backend)


@pytest.mark.parametrize("op", [bsr_dense_mm, bsr_linear], ids=lambda op: op.__name__)
def test_triton_block_sizes(op):
    fields, _ = bsr_operand((32, 32), (8, 16), "full", torch.float32)
    message = r"'triton' backend needs block sizes in \(16, 32, 64, 128\), got 8x16"
    with pytest.raises(ValueError, match=message):
        op(*fields, torch.zeros(32, 32, device=DEVICE), backend="triton")


def test_unknown_backend():
    fields, _ = bsr_operand((32, 32), (16, 16), "full", torch.float32)
    with pytest.raises(ValueError, match=r"bsr_dense_mm: backend must be one of .* got 'cuda'"):
        bsr_dense_mm(*fields, torch.zeros(32, 4, device=DEVICE), backend="cuda")


# (PXKERN_BACKEND, backend=, whether the Triton op runs): backend= wins over
# PXKERN_BACKEND, which wins over the device's default.
BACKEND_OVERRIDES = pytest.mark.parametrize(
    "environment,argument,runs_triton",
    [("triton", None, True), ("torch", None, False), ("torch", "triton", True),
     ("triton", "torch", False)],
)


def spy_on_triton_op(monkeypatch, module_name: str, op_name: str) -> list:
    """Records the calls of a Triton op (still running it): which backend ran."""
    module = importlib.import_module(module_name)
    original, calls = getattr(module, op_name), []

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, op_name, spy)
    return calls


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@BACKEND_OVERRIDES
def test_backend_override(monkeypatch, environment, argument, runs_triton):
    calls = spy_on_triton_op(monkeypatch, "pxkern.kernels.triton.bsr_dense_mm", "bsr_dense_mm_triton")
    monkeypatch.setenv("PXKERN_BACKEND", environment)
    fields, dense = bsr_operand((48, 80), (16, 16), "random", torch.float32)
    x = random_tensor(80, 5, dtype=torch.float32, seed=2)
    actual = bsr_dense_mm(*fields, x, backend=argument)
    assert len(calls) == int(runs_triton), f"PXKERN_BACKEND={environment} backend={argument}"
    assert_matches_float64(actual.cpu(), dense @ x.double().cpu(), torch.float32,
                           TOLERANCES[torch.float32], f"PXKERN_BACKEND={environment}")


def test_import_does_not_import_triton():
    code = (
        "import sys\n"
        "import pxkern, pxkern.ops.bsr_dense_mm, pxkern.ops.bsr_px_scores\n"
        "assert 'triton' not in sys.modules, 'importing pxkern imported triton'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
