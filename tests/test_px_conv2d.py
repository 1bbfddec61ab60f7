"""px_conv2d_forward / px_conv2d_backward (Triton through the interpreter, the CPU kernels
and the PyTorch composition) against the float64 autograd references of pxkern.testing."""

import functools
import re

import pytest
import torch
import torch.nn.functional as F

from pxkern.ops.px_conv2d import px_conv2d_backward, px_conv2d_forward
from pxkern.testing import (
    assert_matches_float64,
    reference_px_layer_backward,
    reference_px_layer_forward,
)

BACKENDS = ["triton", "cpp", "torch"]

# (atol as a fraction of the reference's largest magnitude, rtol), per dtype of the
# result: fp32 accumulation over <= 171 products, then one rounding to the output dtype
# (fp16 2**-11, bf16 2**-8 relative).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# (kernel, stride, padding): the shapes of ResNets and VGGs, plus an asymmetric one.
GEOMETRIES = [
    pytest.param((3, 3), 1, 1, id="3x3-s1-p1"),
    pytest.param((3, 3), 2, 1, id="3x3-s2-p1"),
    pytest.param((3, 3), 1, 0, id="3x3-s1-p0"),
    pytest.param((1, 1), 1, 0, id="1x1-s1"),
    pytest.param((1, 1), 2, 0, id="1x1-s2"),
    pytest.param((3, 1), (2, 1), (1, 0), id="3x1-s21-p10"),
]

# Default layer: N=2, Cin=3, Cout=5, 7 x 9 input, one C sample.
N, CIN, COUT, HEIGHT, WIDTH = 2, 3, 5, 7, 9

# Multipliers as a layer deep in a network sees them (powers of two of the exponents).
MULTIPLIERS = {"u_scale": 2.0**-3, "u_offset_scale": 2.0**-40, "h_scale": 2.0**5, "h_offset_scale": 2.0**-7}


def random_mask(shape, kind, dtype, gen):
    """None, a random 0/1 bool mask (60% ones, or 90% for "mostly-ones"), the same in
    ``dtype``, or all zeros."""
    if kind is None:
        return None
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    mask = torch.rand(shape, generator=gen) < (0.9 if kind == "mostly-ones" else 0.6)
    return mask.to(dtype) if kind == "random-float" else mask


def layer_inputs(
    *, n=N, samples=1, cin=CIN, cout=COUT, size=(HEIGHT, WIDTH), kernel=(3, 3), dtype=torch.float32,
    h_dtype=torch.float64, mask="random", bias=True, affine=True, channels_last=True, seed=0,
):
    """Random forward operands: x, u = x*x (stream B's input), positive h, and the
    layer's weight, mask, bias and BatchNorm scale/shift (``affine="negative"``: a
    negative scale, so that every B and C value is negative before the ReLU)."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def randn(*shape, dtype=dtype):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(n, cin, *size).contiguous(memory_format=layout)
    h = (torch.rand((samples, cin, *size), generator=gen, dtype=torch.float64) + 0.5).to(h_dtype)
    weight = randn(cout, cin, *kernel) * 0.5
    scale = randn(cout, dtype=torch.float32) if affine else None
    if affine == "negative":
        scale = -(scale.abs() + 0.5)
    return {
        "x": x,
        "u": (x * x).contiguous(memory_format=layout),
        "h": h.contiguous(memory_format=layout),
        "weight": weight,
        "mask": random_mask(weight.shape, mask, dtype, gen),
        "bias": randn(cout) if bias else None,
        "scale": scale,
        "shift": randn(cout, dtype=torch.float32) if affine else None,
    }


def conv(stride, padding):
    return functools.partial(F.conv2d, stride=stride, padding=padding)


def assert_close(actual, expected, dtype, context, tolerance_of=None):
    """``actual`` has ``dtype`` and lies within TOLERANCES[tolerance_of or dtype] of the
    float64 ``expected``, the absolute part scaled by the reference's peak so that tiny
    (2**-40) and huge streams are held to the same relative accuracy."""
    atol, rtol = TOLERANCES[tolerance_of or dtype]
    peak = expected.abs().max().item()
    assert_matches_float64(actual, expected, dtype, (atol * peak, rtol), context)


def check_forward(backend, inputs, *, relu=True, stride=1, padding=1, multipliers=MULTIPLIERS, context=""):
    """Runs the forward and compares all five outputs with the float64 reference."""
    a, b, c, b_amax, c_amax = px_conv2d_forward(
        **inputs, relu=relu, stride=stride, padding=padding, backend=backend, **multipliers
    )
    expected_a, expected_b, expected_c = reference_px_layer_forward(
        conv(stride, padding), **inputs, relu=relu, **multipliers
    )
    dtype, h_dtype = inputs["x"].dtype, inputs["h"].dtype
    c_accumulation = torch.float64 if h_dtype == torch.float64 else torch.float32
    context = f"{backend} {context}"
    assert_close(a, expected_a, dtype, f"{context}: a")
    assert_close(b, expected_b, dtype, f"{context}: b")
    assert_close(c, expected_c, h_dtype, f"{context}: c")
    assert_close(b_amax, expected_b.abs().max(), torch.float32, f"{context}: b_amax", tolerance_of=dtype)
    assert_close(c_amax, expected_c.abs().max(), c_accumulation, f"{context}: c_amax", tolerance_of=h_dtype)
    return a, b, c


def check_backward(backend, inputs, g, *, stride=1, padding=1, context=""):
    """Runs the backward and compares g_in and the scores with the autograd reference."""
    args = {"h": inputs["h"], "weight": inputs["weight"], "mask": inputs["mask"], "scale": inputs["scale"]}
    g_in, scores = px_conv2d_backward(g, **args, stride=stride, padding=padding, backend=backend)
    expected_g_in, expected_scores = reference_px_layer_backward(conv(stride, padding), g, **args)
    h_dtype = inputs["h"].dtype
    score_dtype = torch.float64 if h_dtype == torch.float64 else torch.float32
    assert_close(g_in, expected_g_in, h_dtype, f"{backend} {context}: g_in")
    assert_close(scores, expected_scores, score_dtype, f"{backend} {context}: scores")


def output_size(inputs, stride, padding):
    """(Ho, Wo) of the layer."""
    kernel = inputs["weight"].shape[2:]
    stride = (stride, stride) if isinstance(stride, int) else stride
    padding = (padding, padding) if isinstance(padding, int) else padding
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(inputs["x"].shape[2:], kernel, stride, padding))


def random_cotangent(inputs, stride, padding, seed=5):
    """A random g shaped like C's output, in h's dtype."""
    h = inputs["h"]
    gen = torch.Generator().manual_seed(seed)
    shape = (h.shape[0], inputs["weight"].shape[0], *output_size(inputs, stride, padding))
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(h.dtype)


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_geometry(backend, kernel, stride, padding):
    inputs = layer_inputs(kernel=kernel)
    a, b, c = check_forward(backend, inputs, stride=stride, padding=padding, context=f"{kernel} s{stride} p{padding}")
    if backend == "triton":
        # The kernels' own layout (module docstring of pxkern.kernels.triton.px_conv2d).
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b, c))


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_geometry(backend, kernel, stride, padding):
    inputs = layer_inputs(kernel=kernel, samples=2)
    g = random_cotangent(inputs, stride, padding)
    check_backward(backend, inputs, g, stride=stride, padding=padding, context=f"{kernel} s{stride} p{padding}")


@pytest.mark.parametrize("h_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("split", [True, False], ids=["input-gradient-as-convolution", "aten-both"])
@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_cpu_backward_both_ways(monkeypatch, kernel, stride, padding, split, h_dtype):
    """The CPU backward computes the input gradient either with ATen's weight gradient or
    as a convolution of its own, whichever measured faster: each way, forced, against the
    float64 reference."""
    import pxkern.ops.px_conv2d as op

    monkeypatch.setattr(op, "second_is_faster", lambda key, first, second, level: split)
    inputs = layer_inputs(kernel=kernel, samples=2, h_dtype=h_dtype)
    g = random_cotangent(inputs, stride, padding)
    check_backward("cpp", inputs, g, stride=stride, padding=padding,
                   context=f"{kernel} s{stride} p{padding} split={split} h {h_dtype}")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("mask", [None, "mostly-ones", "random", "random-float"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-kernel", "aten"])
@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_cpu_forward_both_kernels(monkeypatch, kernel, stride, padding, sparse, mask, channels_last):
    """Each stream's convolution runs on ATen's or ``sparse_conv2d``, whichever measured
    faster; B's mask, at least half ones here, runs on the sparse kernel as its complement
    with ``ones_scale``. Each way, forced, against the float64 reference."""
    import pxkern.ops.sparse_conv2d as sparse_op

    monkeypatch.setattr(sparse_op, "MAX_SPARSE_DENSITY", 1.0)  # measure even dense weights
    monkeypatch.setattr(sparse_op, "second_is_faster", lambda key, first, second, level: sparse)
    inputs = layer_inputs(kernel=kernel, mask=mask, channels_last=channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        check_forward("cpp", inputs, stride=stride, padding=padding,
                      context=f"{kernel} s{stride} p{padding} sparse={sparse} mask={mask}")
    # The forced kernel ran: all three streams on sparse_conv2d, or none.
    ran = [event.name for event in profile.events()]
    assert ran.count("pxkern::sparse_conv2d") == (3 if sparse else 0), sorted(set(ran))


# (mask, bias, affine, relu): every value of each, most pairs.
OPTIONS = [
    ("random", True, "negative", False),
    (None, True, True, True),
    ("random", False, False, False),
    ("zeros", True, False, True),
    ("random-float", True, True, False),
    (None, False, False, True),
    ("zeros", False, True, False),
]


@pytest.mark.parametrize("mask,bias,affine,relu", OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_options(backend, mask, bias, affine, relu):
    inputs = layer_inputs(mask=mask, bias=bias, affine=affine)
    check_forward(backend, inputs, relu=relu, stride=2, context=f"mask {mask} bias {bias} affine {affine} relu {relu}")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias,affine,relu", [(b, a, r) for b in (True, False) for a in (True, False)
                                              for r in (True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_away_layer(backend, bias, affine, relu, channels_last):
    """An all-zero mask: every stream is the layer's constants (the CPU backend fills them
    without convolutions), in x's layout, and nothing flows back."""
    inputs = layer_inputs(mask="zeros", bias=bias, affine=affine, channels_last=channels_last)
    context = f"pruned away, bias {bias} affine {affine} relu {relu} channels_last {channels_last}"
    check_forward(backend, inputs, relu=relu, stride=1, context=context)
    a = px_conv2d_forward(**inputs, relu=relu, stride=1, padding=1, backend=backend, **MULTIPLIERS)[0]
    layout = torch.channels_last if channels_last or backend == "triton" else torch.contiguous_format
    assert a.is_contiguous(memory_format=layout), f"{context}: a is not in x's layout (Triton's: channels-last)"
    check_backward(backend, inputs, random_cotangent(inputs, 1, 1), context=context)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_b_peak(backend, relu):
    """``b_peak=False``: b_amax is None and every other output is the same as with it."""
    inputs = layer_inputs()
    kwargs = dict(relu=relu, stride=1, padding=1, backend=backend, **MULTIPLIERS)
    with_peak = px_conv2d_forward(*inputs.values(), **kwargs)
    without = px_conv2d_forward(*inputs.values(), b_peak=False, **kwargs)
    assert with_peak[3] is not None and without[3] is None
    for name, expected, actual in zip(("a", "b", "c", "c_amax"), with_peak[:3] + with_peak[4:],
                                      without[:3] + without[4:]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mask,affine", [(None, True), ("zeros", True), ("random-float", False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_options(backend, mask, affine):
    inputs = layer_inputs(mask=mask, affine=affine)
    check_backward(backend, inputs, random_cotangent(inputs, 1, 1), context=f"mask {mask} affine {affine}")


# (x/u/weight dtype, h dtype).
DTYPES = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("dtype,h_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, h_dtype):
    inputs = layer_inputs(dtype=dtype, h_dtype=h_dtype)
    check_forward(backend, inputs, context=f"{dtype} h {h_dtype}")
    check_backward(backend, inputs, random_cotangent(inputs, 1, 1), context=f"{dtype} h {h_dtype}")


@pytest.mark.parametrize("n,samples", [(1, 2), (3, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_c(backend, n, samples):
    # Two C samples span several row tiles; with N=1 (R > N) the last tiles hold C rows
    # only, and their programs must skip A and B.
    inputs = layer_inputs(n=n, samples=samples)
    check_forward(backend, inputs, context=f"N={n} R={samples}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_tiles_and_nchw(backend):
    # Cin 19 and Cout 21 span two of the interpreter config's 16-wide channel tiles
    # (reduction chunks and output columns); NCHW inputs and a channels-last weight are
    # read through their strides.
    inputs = layer_inputs(cin=19, cout=21, size=(5, 6), samples=2, channels_last=False)
    inputs["weight"] = inputs["weight"].contiguous(memory_format=torch.channels_last)
    check_forward(backend, inputs, context="Cin 19 Cout 21 NCHW")
    check_backward(backend, inputs, random_cotangent(inputs, 1, 1), context="Cin 19 Cout 21 NCHW")


@pytest.mark.parametrize("exponent", [-200, 200])
@pytest.mark.parametrize("backend", BACKENDS)
def test_multipliers_beyond_float32(backend, exponent):
    # A float64 stream C's multipliers may leave float32's range; the results must still
    # scale exactly (the values then also leave float32's range, so c_amax is float64).
    big = 2.0**exponent
    multipliers = {"u_scale": 2.0**-40, "u_offset_scale": 2.0**-40, "h_scale": big, "h_offset_scale": big}
    inputs = layer_inputs()
    _, _, c = check_forward(backend, inputs, multipliers=multipliers, context=f"h scales 2**{exponent}")
    plain = dict(multipliers, h_scale=1.0, h_offset_scale=1.0)
    _, _, c_plain, _, _ = px_conv2d_forward(**inputs, relu=True, padding=1, backend=backend, **plain)
    assert torch.equal(c, c_plain * big), f"{backend}: c with multipliers 2**{exponent} is not c * 2**{exponent}"


@pytest.mark.parametrize("op", ["px_conv2d_forward_triton", "px_conv2d_backward_triton"])
def test_opcheck(op):
    # The interpreter cannot run under torch.compile's tracing (aot_dispatch): schema,
    # fake and autograd registration only.
    import pxkern.kernels.triton.px_conv2d  # noqa: F401  (registers the ops)

    inputs = layer_inputs(n=1, size=(4, 5))
    if op == "px_conv2d_forward_triton":
        args = (*inputs.values(), True, 0.5, 2.0**-40, 1.0, 2.0**-7, [2, 2], [1, 1])
    else:
        g = random_cotangent(inputs, 2, 1)
        args = (g, inputs["h"], inputs["weight"], inputs["mask"], inputs["scale"], [2, 2], [1, 1])
    torch.library.opcheck(
        getattr(torch.ops.pxkern, op).default, args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def forward_with(**changes):
    """Calls the forward on the default layer with some arguments replaced."""
    inputs = layer_inputs()
    arguments = dict(inputs, relu=True, padding=1, backend="torch")
    arguments.update(changes)
    return px_conv2d_forward(**arguments)


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"groups": 3}, NotImplementedError, "groups=3 is not supported"),
        ({"dilation": 2}, NotImplementedError, "dilation=2 is not supported"),
        ({"dilation": (1, 2)}, NotImplementedError, "PyTorch path"),
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"padding": (1, 1, 1)}, TypeError, "padding must be an int or a pair"),
        ({"padding": -1}, ValueError, "padding must be >= 0"),
        ({"padding": 0, "weight": torch.ones(COUT, CIN, 9, 3), "mask": None}, ValueError, "does not fit the input"),
        ({"weight": torch.ones(COUT, CIN + 1, 3, 3)}, ValueError, "takes 4 inputs"),
        ({"weight": torch.ones(COUT, CIN, 3, 3, dtype=torch.float64)}, TypeError, "weight must be one of float32"),
        ({"mask": torch.ones(COUT, CIN, 3, 1, dtype=torch.bool)}, ValueError, "mask must be shaped like weight"),
        ({"mask": torch.ones(COUT, CIN, 3, 3, dtype=torch.int8)}, TypeError, "mask must be one of bool, float32"),
        ({"scale": None}, ValueError, "give both or neither"),
        ({"bias": torch.ones(COUT + 1)}, ValueError, "bias must have shape [5]"),
        ({"u": torch.ones(N, CIN, HEIGHT, WIDTH, dtype=torch.float16)}, TypeError, "u must be one of float32"),
        ({"h": torch.ones(1, CIN, HEIGHT, WIDTH + 1)}, ValueError, "h must be [R, 3, 7, 9]"),
        ({"x": torch.ones(N, CIN, HEIGHT), "u": torch.ones(N, CIN, HEIGHT)}, ValueError, "x must be 4-D"),
        ({"h_offset_scale": float("inf")}, ValueError, "h_offset_scale must be finite"),
        ({"u_scale": torch.tensor(1.0)}, TypeError, "u_scale must be a Python float"),
        ({"relu": 1}, TypeError, "relu must be a bool"),
        ({"backend": "numpy"}, ValueError, "backend must be one of ('cpp', 'triton', 'torch')"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_forward_rejects(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        forward_with(**changes)


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"groups": 2}, NotImplementedError, "groups=2 is not supported"),
        ({"g_shape": (1, COUT, 4, 5)}, ValueError, "g must be [R, Cout, 7, 9]"),
        ({"g_shape": (2, COUT, 7, 9)}, ValueError, "same rows R"),
        ({"g_dtype": torch.float32}, TypeError, "h must be one of float32"),
    ],
    ids=["groups", "g spatial", "g rows", "g dtype"],
)
def test_backward_rejects(changes, error, message):
    inputs = layer_inputs()
    g_shape = changes.pop("g_shape", (1, COUT, HEIGHT, WIDTH))
    g = torch.ones(g_shape, dtype=changes.pop("g_dtype", torch.float64))
    with pytest.raises(error, match=re.escape(message)):
        px_conv2d_backward(g, inputs["h"], inputs["weight"], inputs["mask"], inputs["scale"], padding=1,
                           backend="torch", **changes)
