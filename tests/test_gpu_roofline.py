"""benchmarks.gpu_roofline: the script runs and writes its JSON, and its FLOP and byte
formulas agree with independent counts, so the tables in docs/gpu-performance.md cannot
drift silently from what the code computes.

Independent counts: ``FlopCounterMode`` over the fused ops' plain-PyTorch backends (the
same math as the kernels) and over an unfused stream-path sequence written out here; a
dispatch mode that adds the bytes every ATen kernel reads and writes; and hand counts of
the kernels' issued FLOPs.
"""

import json
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_roofline as roofline
from pxkern.ops.px_conv2d import px_conv2d_backward, px_conv2d_forward
from pxkern.ops.px_linear import px_linear_backward, px_linear_forward

# Small odd shapes: N rows of A and B, R rows of C, K inputs, M outputs.
N, R, K, M = 37, 3, 70, 19
LINEAR = roofline.Layer("linear", K, M, rows=N, c_rows=R, bias=True, relu=True, linear=True)
# A 3x3 stride-2 convolution on 10x10 images: 5x5 outputs, 1 image of C.
CONV = roofline.Layer("conv", 6, 11, kernel=3, stride=2, padding=1, size=10, rows=5, c_rows=1, norm=True, relu=True)


class KernelTraffic(TorchDispatchMode):
    """Counts ATen kernels (views excluded) and the bytes of their tensor arguments
    (reads) and results (writes); an in-place op reads and writes its first argument."""

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            self.launches += 1
            reads = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            writes = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in reads + writes)
        return out


def _issued(launches) -> float:
    return sum(launch.total_flops() for launch in launches)


def _math(launches) -> float:
    return sum(launch.math_flops for launch in launches)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _linear_inputs(generator):
    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    mask = torch.rand(M, K, generator=generator) > 0.5
    return rand(N, K), rand(N, K), rand(R, K, dtype=torch.float64), rand(M, K), mask, rand(M)


def _unfused_linear_forward(x, u, h, weight, mask, bias):
    """Streams A, B, C of a Linear + ReLU group as the stream path runs them in eager
    PyTorch (pxkern/px/streams.py, scaled.py): the substituted weights, then per stream
    the product and the exponent's magnitude pass, A's ReLU and sign gate, B's gate.
    ``bias``: the biases of A, B (ones) and C (bias**2), substituted beforehand."""
    bias_a, bias_b, bias_c = bias
    m = mask.to(x.dtype)
    masked = weight * m
    kernel_weight = masked.to(torch.float64)
    kernel_weight.square_()
    a = F.linear(x, masked, bias_a)
    torch.aminmax(a)
    a = torch.relu_(a)
    gate = torch.sign(a)
    b = F.linear(u, m, bias_b)
    torch.aminmax(b)
    gate.mul_(b)
    kernel_weight.requires_grad_()
    c = F.linear(h, kernel_weight, bias_c)
    torch.aminmax(c.detach())
    return c, kernel_weight


def test_script_runs_and_writes_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "roofline.json"
    monkeypatch.setattr(sys, "argv", ["gpu_roofline", "--json", str(out)])
    roofline.main()
    assert "ESTIMATES" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["config"]["estimates_not_measurements"] is True
    kernels = {row.get("kernel") for row in report["rows"]}
    assert {"px_conv2d forward", "px_conv2d backward", "px_linear forward", "px_linear backward", "bsr"} <= kernels
    models = [row for row in report["rows"] if "model" in row]
    assert len(models) == 6
    for row in models:
        for key in ("eval_forward_ms", "unfused_ms", "fused_ms", "fused_per_forward"):
            assert row[key] > 0, (row["model"], row["precision"], key)


def test_linear_fused_math_flops_match_the_ops_torch_backend():
    x, u, h, weight, mask, bias = _linear_inputs(torch.Generator().manual_seed(0))
    g = torch.randn(R, M, dtype=torch.float64)
    forward = _flops(lambda: px_linear_forward(x, u, h, weight, mask, bias, relu=True, backend="torch"))
    backward = _flops(lambda: px_linear_backward(g, h, weight, mask, backend="torch"))
    assert forward == _math(roofline.px_linear_forward(LINEAR, roofline.FP32))
    assert backward == _math(roofline.px_linear_backward(LINEAR, roofline.FP32))


@pytest.mark.parametrize(("rows", "padded", "tiles"), [(3, 16, 1), (100, 128, 2)])
def test_linear_fused_issued_flops_by_hand(rows, padded, tiles):
    """C's R rows go to tl.dot in BLOCK_R = 16..64 tiles (3 rows: one tile of 16; 100
    rows: two of 64), and every C row tile squares its W tile."""
    layer = replace(LINEAR, c_rows=rows)
    forward = (4 * N * M * K               # A and B
               + 2 * padded * M * K        # C on the padded rows
               + tiles * M * K             # C's squares
               + 8 * N * M + 4 * rows * M)  # epilogues
    backward = 4 * padded * M * K + (tiles + 2) * M * K  # scores and g_in; squares, |.|, product
    assert _issued(roofline.px_linear_forward(layer, roofline.FP32)) == forward
    assert _issued(roofline.px_linear_backward(layer, roofline.FP32)) == backward


def test_linear_unfused_sequence_matches_its_model():
    """FLOPs, bytes and launches of the stream path's Linear group, forward and backward."""
    x, u, h, weight, mask, bias = _linear_inputs(torch.Generator().manual_seed(1))
    h.requires_grad_()
    g = torch.randn(R, M, dtype=torch.float64)
    modelled = {
        "forward": roofline.unfused_forward(LINEAR, roofline.FP32),
        "backward": roofline.unfused_backward(LINEAR, roofline.FP32),
    }
    biases = (bias, torch.ones_like(bias), bias.double() ** 2)
    traffic = {"forward": KernelTraffic(), "backward": KernelTraffic()}
    with FlopCounterMode(display=False) as forward_flops, traffic["forward"]:
        c, kernel_weight = _unfused_linear_forward(x, u, h, weight, mask, biases)
    with FlopCounterMode(display=False) as backward_flops, traffic["backward"]:
        _, grad_weight = torch.autograd.grad(c, (h, kernel_weight), g)
        grad_weight.abs() * weight * weight * mask
    counted_flops = {"forward": forward_flops.get_total_flops(), "backward": backward_flops.get_total_flops()}
    for part, launches in modelled.items():
        counted = traffic[part]
        assert _math(launches) == counted_flops[part], part
        assert len(launches) == counted.launches, part
        # The magnitude passes' 2-value results are the only bytes the model leaves out.
        assert sum(launch.bytes for launch in launches) == pytest.approx(counted.bytes, rel=5e-3), part


def test_conv_math_flops_match_flop_counter():
    generator = torch.Generator().manual_seed(2)
    x, u = (torch.randn(CONV.rows, CONV.cin, CONV.size, CONV.size, generator=generator) for _ in range(2))
    h = torch.randn(1, CONV.cin, CONV.size, CONV.size, generator=generator, dtype=torch.float64)
    weight = torch.randn(CONV.cout, CONV.cin, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) > 0.5
    scale, shift = torch.rand(CONV.cout) + 0.5, torch.randn(CONV.cout)
    g = torch.randn(1, CONV.cout, CONV.out_size, CONV.out_size, dtype=torch.float64)
    geometry = {"stride": CONV.stride, "padding": CONV.padding}
    fused_forward = _flops(lambda: px_conv2d_forward(x, u, h, weight, mask, None, scale, shift, relu=True,
                                                     backend="torch", **geometry))
    fused_backward = _flops(lambda: px_conv2d_backward(g, h, weight, mask, scale, backend="torch", **geometry))
    assert fused_forward == _math(roofline.px_conv2d_forward(CONV, roofline.FP32))
    assert fused_backward == _math(roofline.px_conv2d_backward(CONV, roofline.FP32))

    masked = weight * mask
    kernel_weight = masked.double().square().requires_grad_()
    h.requires_grad_()

    def unfused():
        F.conv2d(x, masked, None, **geometry)
        F.conv2d(u, mask.float(), None, **geometry)
        c = F.conv2d(h, kernel_weight, None, **geometry)
        torch.autograd.grad(c, (h, kernel_weight), g)

    modelled = _math(roofline.unfused_forward(CONV, roofline.FP32) + roofline.unfused_backward(CONV, roofline.FP32))
    assert _flops(unfused) == modelled


def test_conv_input_grad_issues_every_tap_at_stride_two():
    """A 3x3 stride-2 convolution: the input-gradient kernel walks all 100 input pixels,
    of which each tap reaches one in four; the useful work is the 25 output positions'."""
    grad, _ = roofline.px_conv2d_backward(CONV, roofline.FP32)
    useful = 2 * CONV.positions * CONV.cout * CONV.depth
    assert grad.math_flops == useful
    assert grad.flops["fp64_mma"] == 4 * useful
