"""pxkern.ops.gate_streams against plain PyTorch (residual add, ReLU of A, gate of B,
the two peaks), on both ISA paths of the C++ kernel and on the PyTorch fallback."""

import math
import re

import pytest
import torch

from pxkern.ops.gate_streams import gate_streams

LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(2, 3),  # not dense in memory order: PyTorch fallback
}


def expected(a, b, a_residual, b_residual, scale, relu):
    """The float64 definition: inputs, sums and gates computed exactly, then rounded."""
    a_in, b_in = a.double(), b.double()
    if a_residual is not None:
        a_in = a_in + a_residual.double()
        b_in = b_in + scale * b_residual.double()
    # The kernel adds in the streams' dtype: round the sums to it before the gate.
    a_in, b_in = a_in.to(a.dtype), b_in.to(a.dtype)
    open_ = a_in > 0 if relu else torch.ones_like(a_in, dtype=torch.bool)
    a_out = torch.where(open_, a_in, torch.zeros_like(a_in))
    b_out = torch.where(open_, b_in, torch.zeros_like(b_in))
    return a_out, b_out, float(a_in.abs().max()), float(b_out.abs().max())


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 32, 32), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_pytorch(isa, shape, dtype, residual, relu, layout):
    gen = torch.Generator().manual_seed(0)
    a, b, ar, br = (LAYOUTS[layout](torch.randn(shape, generator=gen, dtype=dtype)) for _ in range(4))
    a[0, 0, 0, 0] = 0.0  # a closed gate at exactly zero
    if not residual:
        ar = br = None
    scale = 0.125
    want = expected(a, b, ar, br, scale, relu)
    a_out, b_out, peak_a, peak_b = gate_streams(a, b, ar, br, scale, relu=relu)
    assert torch.equal(a_out, want[0]) and torch.equal(b_out, want[1])
    assert (peak_a, peak_b) == want[2:]
    if layout != "transposed":
        assert a_out.stride() == a.stride() and b_out.stride() == b.stride(), "layout kept"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inplace_writes_into_the_inputs(isa, layout):
    gen = torch.Generator().manual_seed(1)
    a, b, ar, br = (LAYOUTS[layout](torch.randn(2, 8, 6, 6, generator=gen)) for _ in range(4))
    want = expected(a, b, ar, br, 2.0, True)
    a_out, b_out, _, _ = gate_streams(a, b, ar, br, 2.0, inplace=True)
    assert a_out is a and b_out is b
    assert torch.equal(a, want[0]) and torch.equal(b, want[1])


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["a", "b", "a_residual", "b_residual"])
def test_not_finite_gives_infinite_peaks(isa, value, where):
    # Deep inside a large tensor, where A's gate closes over it too: any inf or NaN of
    # either stream means the plan cannot go on in this scale.
    tensors = {name: torch.rand(4, 16, 64, 64) + 0.5 for name in ("a", "b", "a_residual", "b_residual")}
    tensors["a"][3, 9, 40, 17] = -10.0
    tensors[where][3, 9, 40, 17] = value
    _, _, peak_a, peak_b = gate_streams(*tensors.values())
    assert peak_a == math.inf and peak_b == math.inf


def test_empty():
    a = torch.empty(0, 3, 4, 4)
    assert gate_streams(a, a.clone())[2:] == (0.0, 0.0)


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"b": torch.ones(2, 3, 4, 5)}, ValueError, "b ((2, 3, 4, 5), torch.float32, cpu) must match a"),
        ({"a_residual": torch.ones(2, 3, 4, 4)}, ValueError, "give both residuals or neither"),
        ({"b": torch.ones(2, 3, 4, 4, dtype=torch.float64)}, ValueError, "must match a"),
        ({"b": torch.ones(2, 3, 4, 4, dtype=torch.int32)}, TypeError, "b must be a floating-point Tensor"),
    ],
    ids=["shape", "one residual", "dtype", "integer"],
)
def test_rejects(changes, error, message):
    arguments = {"a": torch.ones(2, 3, 4, 4), "b": torch.ones(2, 3, 4, 4)}
    arguments.update(changes)
    with pytest.raises(error, match=re.escape(message)):
        gate_streams(**arguments)
