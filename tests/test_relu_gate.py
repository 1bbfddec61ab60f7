"""pxkern.ops.relu_gate against plain PyTorch (leaky_relu, the gate x > 0, max |x|)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pxkern.ops.relu_gate import relu_gate

LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(2, 3),  # not dense in memory order: copied
}


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 32, 32), (1, 1, 1, 1), (0, 4, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_pytorch(isa, shape, dtype, slope, layout):
    torch.manual_seed(0)
    x = LAYOUTS[layout](torch.randn(shape, dtype=dtype))
    if x.numel():
        x[0, 0, 0, 0] = 0.0  # zero: gate 0, as sign() gives
    expected_y = F.leaky_relu(x, slope)
    expected_gate = (x > 0).to(dtype)
    expected_peak = float(x.abs().max()) if x.numel() else 0.0
    y, gate, peak = relu_gate(x, slope)
    assert torch.equal(y, expected_y) and torch.equal(gate, expected_gate)
    assert peak == expected_peak
    if layout != "transposed" and x.numel():
        assert gate.stride() == x.stride() and y.stride() == x.stride(), "layout of x kept"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inplace_writes_into_x(isa, layout):
    x = LAYOUTS[layout](torch.randn(2, 8, 6, 6))
    original = x.clone()
    y, gate, _ = relu_gate(x, 0.1, inplace=True)
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(x, F.leaky_relu(original, 0.1))
    assert torch.equal(gate, (original > 0).float()), "gate taken before x is overwritten"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_gives_infinite_peak(isa, bad, dtype):
    x = torch.ones(3, 100_000, dtype=dtype)  # several OpenMP chunks
    x[2, 77_777] = bad
    assert relu_gate(x)[2] == math.inf


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        relu_gate(torch.ones(3, dtype=torch.int64))
