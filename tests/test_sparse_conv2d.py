"""pxkern sparse_conv2d against F.conv2d evaluated in float64."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.testing import assert_matches_float64
from pxkern.ops.sparse_conv2d import (
    prefer_sparse_conv2d,
    sparse_conv2d,
)

needs_extension = pytest.mark.skipif(
    not EXTENSION_AVAILABLE,
    reason="pxkern._C is not built (pip install --no-build-isolation -e .)",
)

# (atol, rtol) against the float64 reference; float32 sums of up to ~200 products.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
DENSITIES = (1.0, 0.3, 0.05, 0.0)


def assert_close_to_reference(actual, expected, dtype, context: str) -> None:
    assert_matches_float64(actual, expected, dtype, TOLERANCES[dtype], context)


def random_conv_inputs(n, c_in, hw, c_out, kernel, groups, density, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *hw, generator=gen, dtype=torch.float64)
    w_shape = (c_out, c_in // groups, *kernel)
    weight = torch.randn(w_shape, generator=gen, dtype=torch.float64)
    weight *= torch.rand(w_shape, generator=gen, dtype=torch.float64) < density
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def check_against_reference(x, weight, bias, stride, padding, dilation, groups, context):
    expected = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(),
        stride, padding, dilation, groups,
    )
    actual = sparse_conv2d(x, weight, bias, stride, padding, dilation, groups)
    assert_close_to_reference(actual, expected, x.dtype, context)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,groups",
    list(itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2), (1, 2))),
)
def test_matches_conv2d_odd_shapes(isa, dtype, kernel, stride, padding, dilation, groups):
    # Odd sizes (C_in=5, C_out=7, 11x13) for groups=1; the nearest group-divisible ones else.
    c_in, c_out = (5, 7) if groups == 1 else (6, 4)
    for density, with_bias in itertools.product(DENSITIES, (True, False)):
        x, weight, bias = random_conv_inputs(
            3, c_in, (11, 13), c_out, (kernel, kernel), groups, density, dtype
        )
        check_against_reference(
            x, weight, bias if with_bias else None, stride, padding, dilation, groups,
            f"density={density} bias={with_bias}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "hw,kernel,stride,padding,dilation",
    [
        ((9, 45), (3, 3), (1, 1), (1, 1), (1, 1)),  # 45 columns: several column blocks + tail
        ((7, 70), (1, 3), (1, 2), (0, 1), (1, 1)),  # rectangular kernel, per-axis stride
        ((20, 6), (3, 1), (3, 1), (2, 0), (2, 1)),  # output narrower than one vector
        ((1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),   # single pixel
        ((4, 4), (5, 5), (2, 2), (2, 2), (1, 1)),   # kernel larger than the unpadded input
    ],
)
def test_matches_conv2d_unusual_geometry(isa, dtype, hw, kernel, stride, padding, dilation):
    for density in (1.0, 0.3):
        x, weight, bias = random_conv_inputs(2, 3, hw, 5, kernel, 1, density, dtype)
        check_against_reference(x, weight, bias, stride, padding, dilation, 1, f"density={density}")


@pytest.mark.parametrize(
    "c_in,c_out,hw,kernel,stride,padding",
    [
        (16, 16, 32, 3, 1, 1),  # ResNet-20 stage 1
        (32, 32, 16, 3, 1, 1),  # stage 2
        (64, 64, 8, 3, 1, 1),   # stage 3
        (16, 32, 32, 3, 2, 1),  # downsampling 3x3
        (16, 32, 32, 1, 2, 0),  # 1x1 projection shortcut
    ],
)
def test_matches_conv2d_resnet20_shapes(isa, c_in, c_out, hw, kernel, stride, padding):
    for density in (0.5, 0.02):
        x, weight, bias = random_conv_inputs(
            2, c_in, (hw, hw), c_out, (kernel, kernel), 1, density, torch.float32
        )
        check_against_reference(x, weight, bias, stride, padding, 1, 1, f"density={density}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 2), (2, 1), (2, 0), (2, 1)),
     ((1, 1), (2, 2), (0, 0), (1, 1)), ((3, 3), (1, 1), (0, 0), (1, 1))],
)
@pytest.mark.parametrize("density", [0.3, 0.0])
def test_ones_scale_adds_a_constant_per_output_channel(isa, dtype, layout, kernel, stride, padding,
                                                       dilation, density):
    # The complement form of a mostly-ones weight: conv(x, W + s (x) 1), also with an
    # all-zero W (then only the box filter of the channel sum runs), both layouts and the
    # in-place channels-first path (stride 1, no padding).
    x, weight, bias = random_conv_inputs(3, 5, (11, 13), 7, kernel, 1, density, dtype)
    ones_scale = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = F.conv2d(x.double(), weight.double() + ones_scale.reshape(-1, 1, 1, 1), bias.double(),
                        stride, padding, dilation)
    out = sparse_conv2d(x.contiguous(memory_format=layout), weight, bias, stride, padding, dilation,
                        ones_scale=ones_scale.to(dtype))
    assert_close_to_reference(out, expected, dtype, f"ones_scale, density={density}")
    assert out.is_contiguous(memory_format=layout), "layout of x kept"


def test_ones_scale_checks():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="ones_scale needs groups=1"):
        sparse_conv2d(x, w, groups=2, ones_scale=torch.ones(4))
    with pytest.raises(ValueError, match="ones_scale must be"):
        sparse_conv2d(x, torch.randn(4, 4, 3, 3), ones_scale=torch.ones(3))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_all_zero_weight_gives_bias(isa, layout):
    x = torch.randn(2, 4, 9, 7).contiguous(memory_format=layout)
    weight = torch.zeros(3, 4, 3, 3)
    bias = torch.tensor([1.5, -2.0, 0.25])
    out = sparse_conv2d(x, weight, bias, padding=1)
    assert torch.equal(out, bias.view(1, 3, 1, 1).expand(2, 3, 9, 7))
    assert out.is_contiguous(memory_format=layout), "layout of x kept"
    assert torch.equal(sparse_conv2d(x, weight), torch.zeros(2, 3, 7, 5))


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), ((2, 1), (0, 2))])
def test_channels_last_geometries(isa, stride, padding):
    x, weight, bias = random_conv_inputs(3, 5, (11, 9), 7, (3, 3), 1, 0.3, torch.float32)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding)
    out = sparse_conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding)
    assert_close_to_reference(out, expected, torch.float32, f"channels_last stride={stride}")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous_inputs(isa):
    x, weight, bias = random_conv_inputs(2, 6, (10, 12), 4, (3, 3), 1, 0.4, torch.float32)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    channels_last = sparse_conv2d(x.to(memory_format=torch.channels_last), weight, bias, padding=1)
    assert_close_to_reference(channels_last, expected, torch.float32, "channels_last x")
    assert channels_last.is_contiguous(memory_format=torch.channels_last), "layout of x kept"
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    strided_weight = torch.stack([weight, torch.zeros_like(weight)], dim=1)[:, 0]
    assert not transposed.is_contiguous() and not strided_weight.is_contiguous()
    out = sparse_conv2d(transposed, strided_weight, bias, padding=1)
    assert_close_to_reference(out, expected, torch.float32, "transposed x, strided weight")


def test_tuple_arguments_and_zero_batch():
    x, weight, _ = random_conv_inputs(2, 3, (9, 8), 4, (3, 2), 1, 0.5, torch.float64)
    check_against_reference(x, weight, None, (2, 1), (1, 0), (1, 2), 1, "pairs")
    empty = sparse_conv2d(torch.zeros(0, 3, 9, 8, dtype=torch.float64), weight, padding=1)
    assert empty.shape == (0, 4, 9, 9)


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.randn(2, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half()), TypeError,
         "float32 or float64"),
        ((torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3).double()), TypeError, "must match"),
        ((torch.randn(2, 3, 8, 8), torch.randn(4, 2, 3, 3)), ValueError, "3 channels"),
        ((torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3)), ValueError, "x must be 4-D"),
        ((torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5)), ValueError,
         "bias must be"),
    ],
)
def test_bad_input_python(args, error, message):
    with pytest.raises(error, match=message):
        sparse_conv2d(*args)


def test_bad_arguments_python():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        sparse_conv2d(x, w, groups=0)
    with pytest.raises(ValueError, match="stride >= 1"):
        sparse_conv2d(x, w, stride=0, groups=2)
    with pytest.raises(ValueError, match="pair of ints"):
        sparse_conv2d(x, w, padding=(1, 1, 1), groups=2)


@needs_extension
@pytest.mark.parametrize(
    "x,weight,bias,message",
    [
        (torch.randn(2, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half(), None, "float32 or float64"),
        (torch.randn(2, 3, 8, 8), torch.randn(4, 2, 3, 3), None, "x has 3 channels"),
        (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(3), "bias must have shape"),
        (torch.randn(2, 3, 2, 2), torch.randn(4, 3, 3, 3), None, "does not fit"),
    ],
)
def test_bad_input_registered_op(x, weight, bias, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pxkern.sparse_conv2d(x, weight, bias, [1, 1], [0, 0], [1, 1], 1)


@needs_extension
def test_bad_ones_scale_registered_op():
    x, weight = torch.randn(2, 4, 8, 8), torch.randn(4, 2, 3, 3)
    with pytest.raises(RuntimeError, match="ones_scale needs groups=1"):
        torch.ops.pxkern.sparse_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], 2, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"ones_scale must have shape \[4\]"):
        torch.ops.pxkern.sparse_conv2d(x, torch.randn(4, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 1,
                                       torch.ones(5))


@needs_extension
@pytest.mark.parametrize(
    "bias,stride,padding,dilation,groups,ones_scale",
    [(True, [1, 1], [1, 1], [1, 1], 1, False), (False, [2, 2], [0, 1], [1, 2], 2, False),
     (True, [2, 1], [1, 0], [1, 1], 1, True)],
)
def test_opcheck(bias, stride, padding, dilation, groups, ones_scale):
    x, weight, b = random_conv_inputs(2, 4, (9, 11), 6, (3, 3), groups, 0.3, torch.float32)
    torch.library.opcheck(
        torch.ops.pxkern.sparse_conv2d.default,
        (x, weight, b if bias else None, stride, padding, dilation, groups,
         torch.randn(6) if ones_scale else None),
    )


@needs_extension
def test_prefer_sparse_conv2d_measures_and_remembers(monkeypatch):
    import pxkern.ops.measured_choice as measured_choice

    x = torch.randn(4, 8, 12, 12)
    dense = torch.randn(8, 8, 3, 3)
    assert not prefer_sparse_conv2d(x, dense, 1, 1, 1, 1), "above MAX_SPARSE_DENSITY"
    assert prefer_sparse_conv2d(x, torch.zeros(8, 8, 3, 3), 1, 1, 1, 1), "all-zero weight"
    assert not prefer_sparse_conv2d(x, dense * 0, 1, "same", 1, 1), "string padding"
    sparse = dense * (torch.rand(dense.shape, generator=torch.Generator().manual_seed(0)) < 0.2)
    # The stated clock: the sparse kernel (timed first) takes 0 s, oneDNN 1 s.
    timed = []
    monkeypatch.setattr(measured_choice, "_CHOICES", {})
    monkeypatch.setattr(measured_choice, "_best_of_two",
                        lambda run: timed.append(run) or float(len(timed) % 2 == 0))
    assert prefer_sparse_conv2d(x, sparse, 1, 1, 1, 1)
    assert prefer_sparse_conv2d(x, sparse, 1, 1, 1, 1)
    assert len(timed) == 2, "a configuration is measured once (both kernels)"
    prefer_sparse_conv2d(x.contiguous(memory_format=torch.channels_last), sparse, 1, 1, 1, 1)
    assert len(timed) == 4, "the layout is part of the configuration"
    # A density the caller knows (its mask's) is used instead of counting the weight.
    assert not prefer_sparse_conv2d(x, sparse, 1, 1, 1, 1, density=0.9), "above MAX_SPARSE_DENSITY"
    assert prefer_sparse_conv2d(x, dense, 1, 1, 1, 1, density=0.0), "said to be all zeros"
    assert prefer_sparse_conv2d(x, dense, 1, 1, 1, 1, density=0.1)
    assert len(timed) == 4, "sparser than a density where the sparse kernel won: not timed"
    prefer_sparse_conv2d(x, dense, 1, 1, 1, 1, density=0.3)
    assert len(timed) == 6, "density 0.3 is timed"
    prefer_sparse_conv2d(x, torch.zeros(8, 8, 3, 3), 1, 1, 1, 1, ones_scale=torch.ones(8))
    assert len(timed) == 8, "with ones_scale an all-zero weight is measured, as another configuration"
    # Float64 has no oneDNN kernel to lose against: even a dense weight is measured.
    prefer_sparse_conv2d(x.double(), dense.double(), 1, 1, 1, 1)
    assert len(timed) == 10, "a dense float64 weight is measured"


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_pure_pytorch_fallback_when_disabled():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from pxkern._extension import EXTENSION_AVAILABLE\n"
        "from pxkern.ops.sparse_conv2d import sparse_conv2d, prefer_sparse_conv2d\n"
        "assert not EXTENSION_AVAILABLE\n"
        "x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)\n"
        "assert torch.equal(sparse_conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1))\n"
        "s = torch.randn(4)\n"
        "assert torch.equal(sparse_conv2d(x, w, None, 1, 1, ones_scale=s),\n"
        "                   F.conv2d(x, w + s.reshape(-1, 1, 1, 1), None, 1, 1))\n"
        "assert not prefer_sparse_conv2d(x, torch.zeros(4, 3, 3, 3), 1, 1, 1, 1)\n"
    )
    result = _run_python(code, PXKERN_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "could not be loaded" not in result.stderr


def test_missing_extension_warns_once_with_build_hint():
    # sys.modules[name] = None makes `import pxkern._C` raise ImportError.
    code = (
        "import sys, warnings\n"
        "sys.modules['pxkern._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pxkern._extension as ext\n"
        "    import pxkern.ops.sparse_conv2d\n"
        "assert not ext.EXTENSION_AVAILABLE\n"
        "messages = [str(w.message) for w in caught if 'pxkern C++ extension' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'pip install --no-build-isolation -e .' in messages[0], messages[0]\n"
    )
    result = _run_python(code, PXKERN_DISABLE_EXTENSION="0")
    assert result.returncode == 0, result.stderr
