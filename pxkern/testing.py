"""References and comparison helpers shared by the tests and benchmarks.

:func:`reference_px_scores` evaluates spec sections 2-3 the way the authors' code does:
three deep copies of the model with rewritten parameters, ReLU gates recorded in one
forward and replayed in another, a C stream over a whole batch of ones, and autograd for
``dR/dP``. It deliberately shares nothing with the fast implementation (no torch.func, no
TorchFunctionMode): ReLU calls are intercepted by temporarily replacing the ReLU functions
of ``torch`` (the authors' "patched ReLU"), which also catches models that call
``F.relu``/``torch.relu``/``Tensor.relu`` directly, and ``nn.ReLU``/``nn.LeakyReLU``,
whose forward goes through ``F.relu``/``F.leaky_relu``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from pxkern.data import iter_batches
from pxkern.pruning.threshold import global_keep_masks, global_threshold
from pxkern.weights import PRUNABLE_TYPES, last_linear_name, prunable_weights, resolve_masks

__all__ = [
    "NORM_TYPES",
    "assert_same_topk_masks",
    "assert_scores_close",
    "global_topk_masks",
    "reference_px_layer_backward",
    "reference_px_layer_forward",
    "reference_px_scores",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)

# What a ReLU-family call does in one stream: (input, negative_slope, inplace) -> output.
_ReluAction = Callable[[torch.Tensor, float, bool], torch.Tensor]

_MISSING = object()


@contextlib.contextmanager
def _patched_relus(action: _ReluAction) -> Iterator[None]:
    """Route every ReLU / LeakyReLU call made through ``torch`` to ``action`` while active.

    The replacements compute with unpatched primitives, so ``F.relu`` (which calls
    ``torch.relu`` internally) counts as one call.
    """
    replacements = [
        (F, "relu", lambda input, inplace=False: action(input, 0.0, inplace)),
        (F, "relu_", lambda input: action(input, 0.0, True)),
        (F, "leaky_relu", lambda input, negative_slope=0.01, inplace=False: action(input, negative_slope, inplace)),
        (F, "leaky_relu_", lambda input, negative_slope=0.01: action(input, negative_slope, True)),
        (torch, "relu", lambda input: action(input, 0.0, False)),
        (torch, "relu_", lambda input: action(input, 0.0, True)),
        (torch.Tensor, "relu", lambda self: action(self, 0.0, False)),
        (torch.Tensor, "relu_", lambda self: action(self, 0.0, True)),
    ]
    # Tensor.relu lives on the C base class: restore by deleting the override, not by
    # leaving a copy of the base method on torch.Tensor.
    saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name, _ in replacements]
    try:
        for owner, name, replacement in replacements:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


class _GateRecorder:
    """Stream A: record ``G_k = 1[input > 0]`` per call and apply the activation normally."""

    def __init__(self) -> None:
        self.gates: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, negative_slope: float, inplace: bool) -> torch.Tensor:
        gate = x > 0
        self.gates.append(gate)
        out = x.clamp_min(0) if negative_slope == 0 else torch.where(gate, x, x * negative_slope)
        return x.copy_(out) if inplace else out


class _GateApplier:
    """Stream B: ReLU call k returns ``input * G_k``."""

    def __init__(self, gates: list[torch.Tensor]) -> None:
        self.gates = gates
        self.calls = 0

    def __call__(self, x: torch.Tensor, negative_slope: float, inplace: bool) -> torch.Tensor:
        if self.calls >= len(self.gates):
            raise RuntimeError(
                f"stream B made more ReLU calls than stream A ({len(self.gates)}): the model's "
                f"control flow must not depend on its input values"
            )
        gate = self.gates[self.calls]
        if gate.shape != x.shape:
            raise RuntimeError(
                f"ReLU call {self.calls} has input shape {tuple(x.shape)} in stream B and "
                f"{tuple(gate.shape)} in stream A"
            )
        self.calls += 1
        return x.mul_(gate) if inplace else x * gate

    def check_all_used(self) -> None:
        if self.calls != len(self.gates):
            raise RuntimeError(f"stream B made {self.calls} ReLU calls, stream A {len(self.gates)}")


def _identity_relu(x: torch.Tensor, negative_slope: float, inplace: bool) -> torch.Tensor:
    """Stream C: every ReLU-family call is the identity."""
    return x if inplace else x.clone()


def _plain_copy(model: nn.Module, dtype: torch.dtype, bn: str) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` without gradients, in eval mode (BatchNorm in
    train mode when ``bn == "batch"``), with every ``torch.nn.utils.prune``
    reparametrization replaced by a plain parameter: the raw ``weight_orig`` for a
    prunable weight (its mask is applied by the streams), ``orig * mask`` otherwise.
    """
    # prune leaves the effective tensor as a non-leaf attribute, which deepcopy refuses.
    memo: dict[int, Any] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in vars(module):
                memo[id(vars(module)[hook._tensor_name])] = None
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if not isinstance(hook, prune.BasePruningMethod):
                continue
            name = hook._tensor_name
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            original = module._parameters.pop(f"{name}_orig")
            mask = module._buffers.pop(f"{name}_mask")
            vars(module).pop(name, None)
            raw = isinstance(module, PRUNABLE_TYPES) and name == "weight"
            value = original if raw else original * mask
            module.register_parameter(name, nn.Parameter(value.detach().clone()))
    plain.to(dtype)
    plain.requires_grad_(False)
    plain.eval()
    if bn == "batch":
        for module in plain.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    return plain


def _kept_parameter_names(model: nn.Module, keep: Iterable[str] | None) -> set[str]:
    """Names of the *kept* parameters: those of normalization modules and of the modules
    named in ``keep`` (default: the last ``nn.Linear``)."""
    if keep is None:
        last = last_linear_name(model)
        keep = [] if last is None else [last]
    elif isinstance(keep, str):
        raise TypeError(f"keep must be a collection of module names, got the string {keep!r}; use [{keep!r}]")
    modules = dict(model.named_modules())
    kept = set()
    for module_name in keep:
        if module_name not in modules:
            raise ValueError(f"keep names {module_name!r}, which is not a module of the model")
        kept.update(name for name, _ in modules[module_name].named_parameters(prefix=module_name))
    for module_name, module in modules.items():
        if isinstance(module, NORM_TYPES):
            kept.update(name for name, _ in module.named_parameters(prefix=module_name, recurse=False))
    return kept


def _with_values(model: nn.Module, values: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose parameters named in ``values`` hold those values."""
    stream = copy.deepcopy(model)
    params = dict(stream.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    return stream


def _output_tensor(output: Any, stream: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"stream {stream} returned a {type(output).__name__}: expected the model to return a tensor")
    return output


def reference_px_scores(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    keep: Iterable[str] | None = None,
    bn: str = "eval",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Raw (unnormalized) PX scores of spec sections 2-3, computed like the authors' code.

    Args:
        model: any module returning a tensor ``B x K``; left exactly as it was.
        data: one batch ``B x ...`` or an iterable of batches / ``(x, y)`` pairs.
        masks: ``{weight name: 0/1 tensor shaped like the weight}``; default the masks the
            model carries (``torch.nn.utils.prune``), else all ones.
        keep: module names whose parameters stream B and C leave unchanged (besides the
            normalization layers); default the last ``nn.Linear``; ``()`` for none.
        bn: ``"eval"`` (running statistics in every stream) or ``"batch"`` (BatchNorm in
            train mode in streams B and C, the official behaviour; degenerate, spec section 5).
        dtype: the floating dtype of all streams.

    Returns:
        ``{weight name: S_l}``, ``S_l = |G_l| * W_l^2 * M_l`` in ``dtype``, shaped like
        ``W_l``, for every prunable weight in module order.
    """
    if bn not in ("eval", "batch"):
        raise ValueError(f'bn must be "eval" or "batch", got {bn!r}')
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    weights = prunable_weights(model)
    device = weights[0].param.device
    mask = {w.name: m.to(dtype) for w, m in zip(weights, resolve_masks(weights, masks).values())}

    base = _plain_copy(model, dtype, bn)
    kept = _kept_parameter_names(base, keep)
    params = {name: p.detach() for name, p in base.named_parameters() if p.is_floating_point()}
    names = [w.name for w in weights]
    raw = {name: params[name].clone() for name in names}
    masked = {name: raw[name] * mask[name] for name in names}

    # Kept parameters are left as they are in B and C (a kept prunable weight as W * M).
    b_values, c_values = dict(masked), dict(masked)
    for name, p in params.items():
        if name in kept:
            continue
        if name in masked:
            b_values[name] = mask[name]
            c_values[name] = masked[name] ** 2
        else:
            b_values[name] = torch.ones_like(p)
            c_values[name] = p**2
    stream_a = _with_values(base, masked).eval()  # the official code gates in eval mode, bn='batch' too
    stream_b = _with_values(base, b_values)
    stream_c = _with_values(base, c_values)
    c_params = dict(stream_c.named_parameters())
    path_values = [c_params[name].requires_grad_(True) for name in names]

    grads = {name: torch.zeros_like(raw[name]) for name in names}
    for x in iter_batches(data, device):
        x = x.to(dtype)
        recorder = _GateRecorder()
        with torch.no_grad(), _patched_relus(recorder):
            stream_a(x)
        applier = _GateApplier(recorder.gates)
        with torch.no_grad(), _patched_relus(applier):
            z1 = _output_tensor(stream_b(x * x), "B")
        applier.check_all_used()
        with torch.enable_grad(), _patched_relus(_identity_relu):
            z2 = _output_tensor(stream_c(torch.ones_like(x)), "C")
            r = (z1 * z2).sum()
            batch_grads = torch.autograd.grad(r, path_values, allow_unused=True)
        for name, grad in zip(names, batch_grads):
            if grad is not None:
                grads[name] += grad
    return {name: grads[name].abs() * raw[name] ** 2 * mask[name] for name in names}


def global_topk_masks(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global keep masks of spec section 4 (see :func:`pxkern.pruning.threshold.global_keep_masks`)."""
    return global_keep_masks(scores, density)


def _check_same_keys(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing or extra:
        raise AssertionError(f"score keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name in expected:
        if actual[name].shape != expected[name].shape:
            raise AssertionError(
                f"{name}: actual shape {tuple(actual[name].shape)}, expected {tuple(expected[name].shape)}"
            )


def _normalized(scores: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """``scores`` in float64 divided by their global maximum (1 if that is 0)."""
    out = {}
    for name, s in scores.items():
        s = s.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(s).all()):
            index = tuple((~torch.isfinite(s)).nonzero()[0].tolist())
            raise AssertionError(f"{which} scores of {name} are not finite, e.g. at {index}: {s[index].item()}")
        out[name] = s
    peak = max(s.abs().max().item() for s in out.values())
    scale = peak if peak > 0 else 1.0
    return {name: s / scale for name, s in out.items()}


def assert_scores_close(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], rel: float = 1e-4
) -> None:
    """Assert spec section 5's agreement: after dividing each dict by its own global max,
    per layer ``max |a - e| <= rel * max |e|`` (so both may differ by a global factor)."""
    _check_same_keys(actual, expected)
    a_all = _normalized(actual, "actual")
    e_all = _normalized(expected, "expected")
    failures = []
    for name in expected:
        a, e = a_all[name], e_all[name]
        diff = (a - e).abs()
        peak = e.abs().max().item()
        tol = rel * peak
        max_err = diff.max().item()
        if max_err <= tol:
            continue
        index = tuple((diff > tol).nonzero()[0].tolist())
        rel_err = max_err / peak if peak > 0 else math.inf
        failures.append(
            f"{name}: first mismatch at {index} (actual {a[index].item():.6g}, expected "
            f"{e[index].item():.6g}), max abs error {max_err:.3g}, relative error {rel_err:.3g} "
            f"> tolerance {rel:g} (layer max {peak:.3g}, scores divided by their global max)"
        )
    if failures:
        raise AssertionError(f"{len(failures)} of {len(expected)} layers differ:\n" + "\n".join(failures[:10]))


def assert_same_topk_masks(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    densities: Iterable[float] = (0.1, 0.01),
) -> None:
    """Assert both score dicts give the same global keep masks at each density, ignoring
    weights whose expected score is within a relative 1e-6 of the expected threshold."""
    _check_same_keys(actual, expected)
    for density in densities:
        threshold = global_threshold(expected, density)
        actual_masks = global_keep_masks(actual, density)
        differing = []
        count = 0
        for name, e in expected.items():
            e = e.detach()
            tie = torch.zeros_like(e, dtype=torch.bool)
            if math.isfinite(threshold):
                tie = (e - threshold).abs() <= 1e-6 * abs(threshold)
            differ = (actual_masks[name] != (e > threshold)) & ~tie
            n = int(differ.sum())
            count += n
            for index in differ.nonzero()[: max(0, 5 - len(differing))].tolist():
                index = tuple(index)
                differing.append(
                    f"{name}{list(index)} (expected score {e[index].item():.6g}, "
                    f"{'kept' if actual_masks[name][index] else 'pruned'} by actual)"
                )
        if count:
            total = sum(s.numel() for s in expected.values())
            raise AssertionError(
                f"global keep masks at density {density} differ in {count} of {total} weights "
                f"(expected threshold {threshold:.6g}), e.g. " + "; ".join(differing)
            )


def assert_matches_float64(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tolerance: tuple[float, float], context: str
) -> None:
    """Compare a kernel's ``dtype`` result with its float64 reference elementwise
    (``|a - e| <= atol + rtol |e|``); on failure name the first bad index and the largest
    absolute and relative errors."""
    atol, rtol = tolerance
    assert actual.shape == expected.shape, f"{context}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{context}: dtype {actual.dtype} != {dtype}"
    actual = actual.double()
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        rel = (err / expected.abs().clamp_min(1e-30)).max().item()
        raise AssertionError(
            f"{context}: {int(bad.sum())} of {bad.numel()} elements off; first at {first}: "
            f"got {actual[first].item():.9g}, expected {expected[first].item():.9g}; "
            f"max abs err {err.max().item():.3g}, max rel err {rel:.3g} (atol={atol}, rtol={rtol})"
        )


# One layer as the fused-op references call it, ``(input, weight, bias) -> output``:
# ``F.linear``, or ``functools.partial(F.conv2d, stride=2, padding=1)``.
Layer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _per_channel(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``vector [C]`` shaped to broadcast over dimension 1 (the channels) of ``like``."""
    return vector.reshape(-1, *[1] * (like.dim() - 2))


def _float64_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(weight, dtype=torch.float64) if mask is None else mask.to(torch.float64)


def reference_px_layer_forward(
    layer: Layer,
    x: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    relu: bool,
    u_scale: float = 1.0,
    u_offset_scale: float = 1.0,
    h_scale: float = 1.0,
    h_offset_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams A, B and C through one layer, its eval BatchNorm (``scale``, ``shift``)
    and ReLU, in float64, written out from spec section 2 the way the CPU path
    (:mod:`pxkern.px.streams` with :mod:`pxkern.px.scaled`) evaluates them: B's weight is
    the mask and its bias 1, C's weight ``(W*M)^2`` and its bias ``bias^2``; the additive
    constants of B and C (bias, BN shift) are in units of their stream's
    ``*_offset_scale``; the gate is A's sign after the affine. The reference of the fused
    ops ``px_linear_forward``/``px_conv2d_forward``; returns ``(a, b, c)``."""
    d = torch.float64
    x, u, h, w = (t.detach().to(d) for t in (x, u, h, weight))
    m = _float64_mask(w, mask)
    wm = w * m
    a = layer(x, wm, None if bias is None else bias.detach().to(d))
    b = layer(u, m, None) * u_scale
    c = layer(h, wm * wm, None) * h_scale
    if bias is not None:
        b = b + u_offset_scale
        c = c + _per_channel(bias.detach().to(d) ** 2, c) * h_offset_scale
    if scale is not None:
        multiplier, offset = _per_channel(scale.detach().to(d), a), _per_channel(shift.detach().to(d), a)
        a = a * multiplier + offset
        b = b * multiplier + offset * u_offset_scale
        c = c * multiplier + offset * h_offset_scale
    if relu:
        gate = a > 0
        a = torch.where(gate, a, 0.0)
        b = b * gate
    return a, b, c


def reference_px_layer_backward(
    layer: Layer,
    g: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream C's vector-Jacobian product through one layer and its PX score, by autograd
    in float64: C's output ``layer(h, P) * scale`` with ``P = (W*M)^2`` a leaf (the value
    C uses for W, spec section 3), backpropagated from the cotangent ``g``. C's additive
    constants (bias, BN shift) do not change the gradients and are left out. The reference
    of ``px_linear_backward``/``px_conv2d_backward``; returns ``(g_in, |dP| * W^2 * M)``."""
    d = torch.float64
    w = weight.detach().to(d)
    m = _float64_mask(w, mask)
    path = (w * m).square().requires_grad_()
    c_input = h.detach().to(d).requires_grad_()
    with torch.enable_grad():
        c = layer(c_input, path, None)
        if scale is not None:
            c = c * _per_channel(scale.detach().to(d), c)
        g_in, grad_path = torch.autograd.grad(c, (c_input, path), g.detach().to(d))
    return g_in, grad_path.abs() * w**2 * m
