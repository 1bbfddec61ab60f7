"""The fused PX Linear op (px_linear_forward / px_linear_backward) on both backends
against float64 references (:func:`pxkern.testing.reference_px_layer_forward`, and the
autograd one for the backward), and against the stream evaluation of ``px_scores``.

``backend="triton"`` runs the kernels on the GPU when there is one, else on CPU tensors
through Triton's interpreter (see conftest) with one autotuning config of 16 x 16 x 32
tiles: N = 19, M = 37, K = 70 leave partial tiles in every direction.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pxkern.ops.px_layer_common import accumulation_dtype
from pxkern.ops.px_linear import px_linear_backward, px_linear_forward
from pxkern.px.scaled import Exponents
from pxkern.px.streams import (
    Stream,
    StreamState,
    kept_parameter_names,
    run_stream,
    stream_parameters,
)
from pxkern.testing import (
    assert_matches_float64,
    reference_px_layer_backward,
    reference_px_layer_forward,
)
from pxkern.weights import prunable_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
N, K, M = 19, 70, 37
DATA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASKS = ["ones", "none", "random", "zero"]
# (atol as a fraction of the largest expected magnitude, rtol) against float64 results
# of the same rounded inputs: the outputs are rounded once to their dtype (2**-11
# relative for float16, 2**-8 for bfloat16) after float32 sums of 70 products; the
# streams carry arbitrary powers of two, hence an atol relative to the peak.
TOLERANCES = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}
# (u_scale, u_offset_scale) per data dtype: far from 1 where the dtype's range allows.
B_MULTIPLIERS = {torch.float32: (2.0**-40, 2.0**-36), torch.bfloat16: (2.0**-40, 2.0**-36),
                 torch.float16: (2.0**-6, 2.0**-2)}
# (h_scale, h_offset_scale) per h dtype: float64 C gets values outside float32's range.
C_MULTIPLIERS = {torch.float64: (2.0**-200, 2.0**-196), torch.float32: (2.0**-20, 2.0**-16)}
# (bias, affine, relu, R, h dtype): every data dtype and every mask meets each of them.
LAYERS = [
    (True, True, True, 1, torch.float64),
    (False, False, False, 3, torch.float32),
    (True, False, True, 3, torch.float64),
    (False, True, False, 1, torch.float32),
]


def random_tensor(*shape, dtype=torch.float32, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=gen, dtype=torch.float64) if positive else \
        torch.randn(shape, generator=gen, dtype=torch.float64)
    return values.to(dtype=dtype, device=DEVICE)


def make_mask(kind, dtype, seed=7):
    """None, or an M x K mask: float ones/zeros in ``dtype``, or random bool."""
    if kind == "none":
        return None
    if kind == "random":
        return random_tensor(M, K, seed=seed, positive=True) > 0.4
    return torch.full((M, K), 1.0 if kind == "ones" else 0.0, dtype=dtype, device=DEVICE)


def assert_close(actual, expected, dtype, context, rounding=None):
    """Elementwise ``|a - e| <= atol * max|e| + rtol * |e|`` with the tolerances of the
    dtype ``rounding`` (default ``dtype``, which ``actual`` must have)."""
    atol, rtol = TOLERANCES[rounding or dtype]
    peak = expected.abs().max().item()
    assert_matches_float64(actual.cpu(), expected.cpu(), dtype, (atol * peak, rtol), context)


def forward_case(dtype, mask_kind, bias, affine, rows, h_dtype, n=N):
    """The forward's arguments: u >= 0 and h > 0 like stream values, BN folded per
    channel (float64 when C is float64, as a caller keeping C's precision passes it)."""
    u_scale, u_offset_scale = B_MULTIPLIERS[dtype]
    h_scale, h_offset_scale = C_MULTIPLIERS[h_dtype]
    affine_dtype = torch.float64 if h_dtype == torch.float64 else torch.float32
    x = random_tensor(n, K, dtype=dtype, seed=1)
    return {
        "x": x,
        "u": x.square(),
        "h": random_tensor(rows, K, dtype=h_dtype, seed=2, positive=True),
        "weight": (random_tensor(M, K, seed=3) / K**0.5).to(dtype),
        "mask": make_mask(mask_kind, dtype),
        "bias": random_tensor(M, dtype=dtype, seed=4) / 2 if bias else None,
        "scale": random_tensor(M, dtype=affine_dtype, seed=5, positive=True) + 0.5 if affine else None,
        "shift": random_tensor(M, dtype=affine_dtype, seed=6) / 2 if affine else None,
        "u_scale": u_scale, "u_offset_scale": u_offset_scale,
        "h_scale": h_scale, "h_offset_scale": h_offset_scale,
    }


def check_forward(args, relu, backend, context):
    a, b, c, b_amax, c_amax = px_linear_forward(**args, relu=relu, backend=backend)
    expected = reference_px_layer_forward(F.linear, **args, relu=relu)
    data_dtype, h_dtype = args["x"].dtype, args["h"].dtype
    assert_close(a, expected[0], data_dtype, f"{context} a")
    assert_close(b, expected[1], data_dtype, f"{context} b")
    assert_close(c, expected[2], h_dtype, f"{context} c")
    for name, amax, stored, reference, dtype in (("b_amax", b_amax, b, expected[1], data_dtype),
                                                 ("c_amax", c_amax, c, expected[2], h_dtype)):
        assert amax.shape == () and amax.dtype == torch.float32, f"{context} {name}: {amax.shape} {amax.dtype}"
        assert amax.item() == stored.abs().max().float().item(), f"{context} {name} is not max |stored|"
        assert_close(amax, reference.abs().max().float().double(), torch.float32, f"{context} {name}", dtype)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_b_peak(backend, relu):
    """``b_peak=False``: b_amax is None and every other output is the same as with it."""
    args = forward_case(torch.float32, "random", True, True, 1, torch.float64)
    with_peak = px_linear_forward(**args, relu=relu, backend=backend)
    without = px_linear_forward(**args, relu=relu, backend=backend, b_peak=False)
    assert with_peak[3] is not None and without[3] is None
    for name, expected, actual in zip(("a", "b", "c", "c_amax"), with_peak[:3] + with_peak[4:],
                                      without[:3] + without[4:]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=str)
def test_forward_matches_float64(dtype, mask_kind, backend):
    bias, affine, relu, rows, h_dtype = LAYERS[(DATA_DTYPES.index(dtype) + MASKS.index(mask_kind)) % len(LAYERS)]
    args = forward_case(dtype, mask_kind, bias, affine, rows, h_dtype)
    context = f"{backend} {dtype} mask={mask_kind} bias={bias} affine={affine} relu={relu} R={rows} h={h_dtype}"
    check_forward(args, relu, backend, context)


def backward_case(h_dtype, weight_dtype, mask_kind, rows, with_scale):
    return {
        "g": random_tensor(rows, M, dtype=h_dtype, seed=11),
        "h": random_tensor(rows, K, dtype=h_dtype, seed=12, positive=True),
        "weight": (random_tensor(M, K, seed=13) / K**0.5).to(weight_dtype),
        "mask": make_mask(mask_kind, weight_dtype),
        "scale": random_tensor(M, dtype=h_dtype, seed=14, positive=True) + 0.5 if with_scale else None,
    }


def check_backward(args, backend, context):
    g_in, scores = px_linear_backward(**args, backend=backend)
    expected_g_in, expected_scores = reference_px_layer_backward(F.linear, **args)
    h_dtype = args["h"].dtype
    assert_close(g_in, expected_g_in, h_dtype, f"{context} g_in")
    assert_close(scores, expected_scores, accumulation_dtype(h_dtype), f"{context} scores")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("h_dtype,weight_dtype", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["h-float64", "h-float32"])
def test_backward_matches_float64(h_dtype, weight_dtype, mask_kind, backend):
    rows, with_scale = [(1, True), (3, False), (3, True), (1, False)][MASKS.index(mask_kind)]
    args = backward_case(h_dtype, weight_dtype, mask_kind, rows, with_scale)
    context = f"{backend} h={h_dtype} W={weight_dtype} mask={mask_kind} R={rows} scale={with_scale}"
    check_backward(args, backend, context)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_c_rows_than_a_tile(backend):
    # R = 67 > 64 rows of C per tile, with N = 5: the forward's programs beyond the one
    # A/B row tile compute C alone, the backward tiles R over its third grid axis.
    args = forward_case(torch.float32, "random", True, True, 67, torch.float64, n=5)
    check_forward(args, True, backend, f"{backend} R=67 N=5 forward")
    check_backward(backward_case(torch.float64, torch.float32, "random", 67, True), backend, f"{backend} R=67 backward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_stream_evaluation_of_px_scores(backend):
    """One Linear + eval BatchNorm1d + ReLU through :mod:`pxkern.px.streams` (stream
    values as mantissas with exponents, as px_scores evaluates them) equals the fused op
    given those exponents as multipliers: B's bias is 1 and C's bias**2, in units of the
    input's exponent, the BN folds into scale/shift, and the backward's scores are C's
    gradients times W**2 * M."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, M), nn.BatchNorm1d(M), nn.ReLU()).to(DEVICE)
    linear, norm = model[0], model[1]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    [weight] = prunable_weights(model)
    mask = make_mask("random", torch.float32)
    params = stream_parameters(model, [weight], {weight.name: mask.float()}, kept_parameter_names(model, ()),
                               torch.float32)
    buffers = dict(model.named_buffers())
    x = random_tensor(N, K, seed=21) * 2.0**12  # |x * x| > 2**20: B starts with an exponent
    h = torch.full((1, K), 2.0**30, dtype=torch.float64, device=DEVICE)  # so does C
    gates = StreamState(Stream.GATES, Exponents())
    a_stream, _ = run_stream(model, gates, x, params.gates, buffers, "eval")
    paths = StreamState(Stream.PATHS, Exponents(), gates.gates, params.ones_weights)
    b_stream, b_exponent = run_stream(model, paths, x * x, params.paths, buffers, "eval")
    kernel_buffers = {name: b.double() if b.is_floating_point() else b for name, b in buffers.items()}
    g = random_tensor(1, M, dtype=torch.float64, seed=22)
    kernel = StreamState(Stream.KERNEL, Exponents())
    with torch.enable_grad():
        c_stream, c_exponent = run_stream(model, kernel, h, params.kernel, kernel_buffers, "eval")
        [path_grad] = torch.autograd.grad(c_stream, [params.kernel_weights[weight.name]], g)

    u_exponents, h_exponents = Exponents(), Exponents()
    u, h_mantissa = u_exponents.start(x * x), h_exponents.start(h)
    u_exponent, h_exponent = u_exponents.of(u), h_exponents.of(h_mantissa)
    assert u_exponent != 0 and h_exponent != 0
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    shift = norm.bias.double() - norm.running_mean.double() * scale
    w, bias = linear.weight.detach(), linear.bias.detach()
    a, b, c, _, _ = px_linear_forward(
        x, u, h_mantissa, w, mask, bias, scale, shift, relu=True,
        u_offset_scale=2.0**-u_exponent, h_offset_scale=2.0**-h_exponent, backend=backend,
    )
    assert_close(a, a_stream.double(), torch.float32, f"{backend} A")
    assert_close(b.double() * 2.0**u_exponent, b_stream.double() * 2.0**b_exponent, torch.float64,
                 f"{backend} B (true values)", rounding=torch.float32)
    assert_close(c * 2.0**h_exponent, c_stream.detach() * 2.0**c_exponent, torch.float64, f"{backend} C (true values)")

    # R = <g, c_stream> = <g * 2**(h_exponent - c_exponent), c>.
    _, scores = px_linear_backward(g * 2.0**(h_exponent - c_exponent), h_mantissa, w, mask, scale, backend=backend)
    assert_close(scores, path_grad.abs() * w.double().square() * mask, torch.float64, f"{backend} scores")


def test_opcheck():
    # The interpreter cannot run under torch.compile's tracing (aot_dispatch): on the CPU,
    # schema, fake and autograd registration only.
    import pxkern.kernels.triton.px_linear  # noqa: F401  (registers the ops)

    utils = {"test_utils": ("test_schema", "test_faketensor", "test_autograd_registration")} if DEVICE == "cpu" else {}
    args = forward_case(torch.float32, "random", True, True, 3, torch.float64)
    torch.library.opcheck(
        torch.ops.pxkern.px_linear_forward_triton.default,
        (*[args[k] for k in ("x", "u", "h", "weight", "mask", "bias", "scale", "shift")], True,
         args["u_scale"], args["u_offset_scale"], args["h_scale"], args["h_offset_scale"]),
        **utils,
    )
    backward = backward_case(torch.float64, torch.float32, "random", 3, True)
    torch.library.opcheck(torch.ops.pxkern.px_linear_backward_triton.default, tuple(backward.values()), **utils)


def test_torch_backend_does_not_import_triton():
    code = (
        "import sys, torch\n"
        "from pxkern.ops.px_linear import px_linear_backward, px_linear_forward\n"
        "x = torch.rand(3, 5)\n"
        "px_linear_forward(x, x, x[:1].double(), torch.rand(4, 5), relu=True, backend='torch')\n"
        "px_linear_backward(torch.rand(1, 4), x[:1], torch.rand(4, 5), backend='torch')\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PXKERN_BACKEND": ""},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def _forward_with(**changes):
    args = forward_case(torch.float32, "random", True, True, 1, torch.float64)
    args.update(changes)
    relu = args.pop("relu", True)
    px_linear_forward(**args, relu=relu)


def _backward_with(**changes):
    args = backward_case(torch.float64, torch.float32, "random", 1, True)
    args.update(changes)
    px_linear_backward(**args)


def _float32(*shape):
    return torch.zeros(shape, device=DEVICE)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: _forward_with(x=_float32(N, K).int()), TypeError, "x must be one of float32"),
        (lambda: _forward_with(x=_float32(N, K).double()), TypeError, "x must be one of float32"),
        (lambda: _forward_with(u=_float32(N, K + 1)), ValueError, "u must be shaped like x"),
        (lambda: _forward_with(u=_float32(N, K).half()), TypeError, "u must be one of float32"),
        (lambda: _forward_with(x=_float32(N, K, 1)), ValueError, "x must be 2-D"),
        (lambda: _forward_with(h=_float32(1, K + 1).double()), ValueError, r"h must be \[R, 70\]"),
        (lambda: _forward_with(h=_float32(0, K).double()), ValueError, "h is empty"),
        (lambda: _forward_with(weight=_float32(M, K + 1)), ValueError, "weight .* takes 71 inputs"),
        (lambda: _forward_with(weight=_float32(M, K).half()), TypeError, "weight must be one of float32"),
        (lambda: _forward_with(mask=_float32(M, K - 1)), ValueError, "mask must be shaped like weight"),
        (lambda: _forward_with(mask=_float32(M, K).int()), TypeError, "mask must be one of bool, float32"),
        (lambda: _forward_with(bias=_float32(M + 1)), ValueError, r"bias must have shape \[37\]"),
        (lambda: _forward_with(bias=torch.zeros(M, device="meta")), ValueError, "bias is on meta"),
        (lambda: _forward_with(shift=None), ValueError, "give both or neither"),
        (lambda: _forward_with(scale=_float32(M).int()), TypeError, "scale must be one of"),
        (lambda: _forward_with(relu=1), TypeError, "relu must be a bool"),
        (lambda: _forward_with(u_offset_scale=float("inf")), ValueError, "u_offset_scale must be finite"),
        (lambda: _forward_with(h_scale="1"), TypeError, "h_scale must be a Python float"),
        (lambda: _forward_with(backend="cpp"), ValueError, r"backend must be one of \('triton', 'torch'\)"),
        (lambda: _backward_with(h=_float32(2, K).double()), ValueError, "g and h must have the same rows"),
        (lambda: _backward_with(h=_float32(1, K)), TypeError, "h must be one of float64"),
        (lambda: _backward_with(g=_float32(1, M + 1).double()), ValueError, "maps 70 inputs to 37 outputs"),
        (lambda: _backward_with(weight=_float32(M, K).double()), TypeError, "weight must be one of float32"),
        (lambda: _backward_with(scale=_float32(M - 1).double()), ValueError, r"scale must have shape \[37\]"),
        (lambda: _backward_with(backend="cpp"), ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()
