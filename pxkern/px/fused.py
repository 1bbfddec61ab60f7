"""The fused path of PX scoring: a traced plan of layer groups run with the fused ops.

Each Linear/Conv2d layer with the eval BatchNorm and ReLU that follow it runs as one
call of :mod:`pxkern.ops.px_linear` / :mod:`pxkern.ops.px_conv2d`: streams A, B and C in
one pass over the weight, BatchNorm, gate and ReLU in the epilogue (px-spec.md section 6).
Stream C's backward through the layer is the op's backward, which returns the layer's
scores from the same pass over the weight. Everything between the layers (residual adds,
pooling, flatten, standalone BatchNorm or ReLU) runs once per stream in plain PyTorch, C
under autograd.

The plan comes from tracing the model with ``torch.fx``. :func:`build_plan` accepts the
modules and functions listed in ``_HOMOGENEOUS_*`` and the layer groups above, and returns
the reason it refuses anything else (a custom layer, LeakyReLU, BatchNorm with batch
statistics, forward hooks, ...): ``px_scores`` then scores the whole model on the stream
path (:mod:`pxkern.px.streams`), which handles any model. The two paths compute the same
scores. The plan is the default on the GPU (Triton ops: fusing the streams saves their
memory traffic) and on the CPU inside :func:`plans_reused`, as ``prune`` runs its rounds
(``"cpp"``: oneDNN or ``sparse_conv2d`` per layer, and the C++ kernel ``gate_streams`` for
each ReLU with the residual add before it, in one pass: 13% less time than the stream path
over the 100-round ResNet-20 prune). A single CPU call takes the stream path, which was
faster there (ResNet-20, B=128: 128 against 167 ms): the trace and the fresh memory of the
plan's activations cost more than one call saves; across rounds both are reused. The CPU
plan leaves hidden Linear layers to the stream path, whose block-sparse kernels serve
pruned ones.

Stream A runs in true scale (float32, no exponent). On the CPU its range is checked where
the values are measured anyway, at the ReLUs between layer groups, and at the input of
the kept classifier; outside ``streams.TRUE_SCALE_RANGE`` the plan raises
``LeftTrueScale`` and ``px_scores`` runs the stream path, which scales A.

Exponents follow the rules of :mod:`pxkern.px.scaled`: B and C travel as mantissas with a
power-of-two exponent; each fused layer first brings its input's peak to [1/2, 1) through
the op's ``*_scale`` arguments (its peak is known from the previous layer's epilogue or
measured), so no stream value leaves float32's range at any depth.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.profiler import record_function
from torch.nn.utils.prune import BasePruningMethod

from pxkern.ops.gate_streams import gate_streams
from pxkern.px.scaled import ScaledSum, folded_batch_norm, largest_magnitude, magnitude_exponent
from pxkern.px.streams import check_true_scale
from pxkern.weights import PrunableWeight, is_all_ones

__all__ = ["FusedPlan", "build_plan", "cached_plan", "plans_reused", "reusing_plans"]

# Modules and functions linear in their one stream input, run unchanged on every stream
# (the official code does so for pooling): the exponent passes through.
_HOMOGENEOUS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout,
)
_HOMOGENEOUS_FUNCTIONS = frozenset(
    {torch.flatten, torch.reshape, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
     F.adaptive_max_pool2d, F.pad, F.dropout, operator.getitem}
)
_HOMOGENEOUS_METHODS = frozenset({"view", "reshape", "flatten", "contiguous", "mean", "squeeze", "unsqueeze"})
_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_})
_RELU_METHODS = frozenset({"relu", "relu_"})
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_METADATA_METHODS = frozenset({"size", "dim"})
_NORMALIZATIONS = (nn.BatchNorm1d, nn.BatchNorm2d)


# Profiler ranges (``torch.profiler``): the data pass, which runs streams A, B and (on
# the first batch) C's forward layer by layer, and C's backward, which leaves the scores;
# or both in the one call of the plan's lowered program (:mod:`pxkern.px.program`).
PLAN_LABELS = {"forward": "pxkern::plan_forward", "backward": "pxkern::plan_backward",
               "program": "pxkern::plan_program"}


class UnsupportedByPlan(Exception):
    """The model has something the fused plan does not run; the message says what."""


@dataclass
class StreamValues:
    """One value of the model's forward in the three streams.

    ``b``/``c`` are mantissas of ``b * 2**b_exponent`` and ``c * 2**c_exponent``;
    ``*_peak`` is the magnitude exponent of the mantissa when an op already measured it.
    ``c`` is None in batches after the first (stream C does not depend on the data).
    """

    a: torch.Tensor
    b: torch.Tensor
    b_exponent: int
    c: torch.Tensor | None
    c_exponent: int
    b_peak: int | None = None
    c_peak: int | None = None


def _normalizing_shift(mantissa: torch.Tensor, peak: int | None) -> int:
    """The power of two ``s`` that brings the mantissa's peak into [1/2, 1) after
    multiplying by ``2**-s``; 0 for an all-zero tensor."""
    if peak is None:
        peak = magnitude_exponent(mantissa)
    return 0 if peak is None else peak


@dataclass
class LayerGroup:
    """A Linear/Conv2d layer, with the eval BatchNorm and ReLU it feeds if any."""

    weight: PrunableWeight
    module: nn.Module
    layer_input: fx.Node
    norm: nn.Module | None
    relu: bool
    ops: tuple[Callable, Callable]  # the fused op's forward and backward
    scores: torch.Tensor | None = None  # left by stream C's backward
    # False when the output only enters a residual add + ReLU that measures B's peak
    # itself (``gated_sums``): the op then skips measuring it.
    b_peak_needed: bool = True
    # The last affine with what it was computed from: a plan reused over the rounds of a
    # prune folds each BatchNorm once instead of ~10 small ops per layer and round.
    _affine: tuple[tuple, tuple] | None = None

    def affine(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The eval BatchNorm as per-channel ``(scale, shift)``, or ``(None, None)``;
        recomputed when any of its tensors was replaced or changed in place."""
        if self.norm is None:
            return None, None
        norm = self.norm
        key = (dtype, norm.eps, *(None if t is None else (id(t), t._version)
                                  for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias)))
        if self._affine is None or self._affine[0] != key:
            self._affine = (key, _folded_norm(norm, dtype))
        return self._affine[1]


def _folded_norm(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm``'s eval ``(scale, shift)`` in ``dtype``."""
    def cast(t):
        return None if t is None else t.detach().to(dtype)

    return folded_batch_norm(cast(norm.running_mean), cast(norm.running_var), cast(norm.weight),
                             cast(norm.bias), norm.eps)


class _KernelThroughLayer(torch.autograd.Function):
    """Stream C through a fused layer: the forward value comes from the fused forward
    call; the backward is the op's backward, which also leaves the layer's scores."""

    @staticmethod
    def forward(ctx, h, c_out, backward: Callable, group: LayerGroup, scale):
        ctx.save_for_backward(h)
        ctx.backward, ctx.group, ctx.scale = backward, group, scale
        return c_out.view_as(c_out)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        # The kernels address the cotangent through its strides: no layout copy.
        grad_in, ctx.group.scores = ctx.backward(grad, h, ctx.scale)
        return grad_in, None, None, None, None


@dataclass
class FusedPlan:
    """A traced model as steps over :class:`StreamValues`; see the module docstring."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    groups: dict[fx.Node, LayerGroup]  # keyed by the node whose value the group produces
    absorbed: set[fx.Node]  # layer, BatchNorm and ReLU nodes run inside a group
    kept: dict[fx.Node, PrunableWeight | None]  # layers run with their own parameters
    backend: str  # of the fused ops
    # "cpp" only: a ReLU -> the residual add before it, run together (the add is absorbed)
    gated_sums: dict[fx.Node, fx.Node] = field(default_factory=dict)
    # "cpp" only: the plan lowered to one C++ call (pxkern.px.program) per batch shape,
    # None where it does not lower
    programs: dict[tuple, Any] = field(default_factory=dict)

    @property
    def relu_streams(self) -> Callable[[StreamValues], StreamValues]:
        """How the ReLUs outside the layer groups run: on the CPU in one pass of the C++
        kernel, which also checks A's range; elsewhere composed of PyTorch ops."""
        return _gated_streams if self.backend == "cpp" else _relu_streams

    def run(self, x: torch.Tensor, masks: dict[str, torch.Tensor], with_kernel: bool,
            kernel_leaves: dict[str, torch.Tensor]) -> tuple[StreamValues, dict]:
        """Evaluates the model's three streams on the batch ``x``; C only if
        ``with_kernel`` (on one all-ones sample, under autograd). ``kernel_leaves``
        receives the leaves C differentiates for the kept layers."""
        env: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            if node.op == "output":
                output = _resolve(node.args[0], env)
                if not isinstance(output, StreamValues):
                    raise TypeError(
                        f"the model returned a {type(output).__name__}: PX scoring needs a model "
                        f"whose forward returns one tensor"
                    )
                return output, env
            if node in self.absorbed and node not in self.groups:
                continue
            if node.op == "placeholder":
                env[node] = _input_streams(x, with_kernel)
            elif node in self.groups:
                group = self.groups[node]
                env[node] = self._run_group(group, env[group.layer_input], masks)
            elif node in self.kept:
                if self.backend == "cpp":
                    check_true_scale(largest_magnitude([env[node.args[0]].a]), x.dtype)
                env[node] = _run_kept(self.modules[node.target], self.kept[node],
                                      env[node.args[0]], masks, kernel_leaves)
            elif node in self.gated_sums:
                env[node] = _gated_streams(*_resolve(self.gated_sums[node].args, env))
            else:
                env[node] = _run_between_layers(node, self.modules, env, self.relu_streams)
        raise UnsupportedByPlan("the traced graph has no output")

    def raw_scores(self, batches: Iterable[torch.Tensor], masks: dict[str, torch.Tensor],
                   weights: list[PrunableWeight]) -> dict[str, torch.Tensor]:
        """``|G_l| * W_l**2`` (masked) of every weight, up to one positive global factor:
        the data pass over ``batches`` accumulates ``v``, the first batch also runs C,
        whose backward with cotangent ``v`` leaves the scores."""
        v = ScaledSum()
        kernel_leaves: dict[str, torch.Tensor] = {}
        first = None
        with record_function(PLAN_LABELS["forward"]):
            for x in batches:
                out, _ = self.run(x, masks, first is None, kernel_leaves)
                if self.backend == "cpp":
                    check_true_scale(largest_magnitude([out.a]), out.a.dtype)
                if first is None:
                    first = out
                v.add(out.b.detach().sum(0), out.b_exponent)
        with record_function(PLAN_LABELS["backward"]):
            first.c.backward(v.direction().to(first.c.dtype).expand_as(first.c))
        found = {group.weight.name: group.scores for group in self.groups.values()}
        for weight in self.kept.values():
            leaf = kernel_leaves.get(weight.name) if weight is not None else None
            if leaf is not None and leaf.grad is not None:
                w = weight.param.detach().double()
                found[weight.name] = leaf.grad.abs() * w * w * masks[weight.name]
        return {w.name: found[w.name] if found.get(w.name) is not None
                else torch.zeros(w.shape, dtype=torch.float64, device=w.param.device) for w in weights}

    def _run_group(self, group: LayerGroup, t: StreamValues, masks) -> StreamValues:
        if isinstance(group.module, nn.Linear) and t.a.dim() != 2:
            return self._run_linear_on_rows(group, t, masks)
        return self._run_layer(group, t, masks)

    def _run_linear_on_rows(self, group: LayerGroup, t: StreamValues, masks) -> StreamValues:
        """A Linear layer on ``[..., features]`` values: the op sees the rows (C's one
        sample gives R rows, e.g. its tokens). A BatchNorm after it normalizes dimension 1,
        not the features, so it runs separately, and the ReLU after it."""
        lead, features = t.a.shape[:-1], t.a.shape[-1]

        def rows(v):
            return None if v is None else v.reshape(-1, features)

        flat = StreamValues(rows(t.a), rows(t.b), t.b_exponent, rows(t.c), t.c_exponent, t.b_peak, t.c_peak)
        out = self._run_layer(group, flat, masks, epilogue=group.norm is None)
        outputs = group.module.out_features

        def unrows(v, sample_lead):
            return None if v is None else v.reshape(*sample_lead, outputs)

        out = StreamValues(unrows(out.a, lead), unrows(out.b, lead), out.b_exponent,
                           unrows(out.c, (1, *lead[1:])), out.c_exponent, out.b_peak, out.c_peak)
        if group.norm is not None:
            out = _norm_streams(group.norm, out)
            if group.relu:
                out = _relu_streams(out)
        return out

    def _run_layer(self, group: LayerGroup, t: StreamValues, masks, epilogue: bool = True) -> StreamValues:
        """The group's fused op call; without ``epilogue`` the layer alone (its
        BatchNorm and ReLU are then the caller's)."""
        module, weight = group.module, group.weight
        mask = masks[weight.name]
        mask = None if is_all_ones(mask) else mask.to(torch.bool)
        w = weight.param.detach()
        bias = module.bias.detach() if module.bias is not None else None
        # In float64: the ops round it to float32 for A and B, and C's gradients cancel to
        # 1e-3 of their terms in early layers, where a float32 affine in C gave 1.2e-4
        # relative error (VGG-16-bn at density 0.02).
        scale, shift = group.affine(torch.float64) if epilogue else (None, None)
        sb = _normalizing_shift(t.b, t.b_peak)
        b_exponent = t.b_exponent + sb
        h = t.c if t.c is not None else _kernel_input(t.a)
        sc = _normalizing_shift(h, t.c_peak) if t.c is not None else 1
        c_exponent = t.c_exponent + sc
        geometry = _geometry(module)
        forward, backward = group.ops
        with torch.no_grad():
            a, b, c, b_amax, c_amax = forward(
                t.a, t.b, h.detach(), w, mask, bias, scale, shift, relu=group.relu and epilogue,
                u_scale=math.ldexp(1.0, -sb), u_offset_scale=math.ldexp(1.0, -b_exponent),
                h_scale=math.ldexp(1.0, -sc), h_offset_scale=math.ldexp(1.0, -c_exponent),
                **geometry, backend=self.backend, b_peak=group.b_peak_needed,
            )
        b_peak = magnitude_exponent(b_amax) if b_amax is not None else None
        if t.c is None:
            return StreamValues(a, b, b_exponent, None, 0, b_peak)
        # The op's backward multiplies the cotangent by `scale`: the BatchNorm's and the
        # input normalization's factors both sit between C's input and the weight.
        kernel_scale = scale.double() * math.ldexp(1.0, -sc) if scale is not None else None
        if kernel_scale is None and sc != 0:
            kernel_scale = torch.full((w.shape[0],), math.ldexp(1.0, -sc), dtype=torch.float64, device=w.device)

        def layer_backward(grad, h_saved, grad_scale):
            return backward(grad, h_saved, w, mask, grad_scale, **geometry, backend=self.backend)

        c = _KernelThroughLayer.apply(h, c, layer_backward, group, kernel_scale)
        return StreamValues(a, b, b_exponent, c, c_exponent, b_peak, magnitude_exponent(c_amax))


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Stream C's input: one all-ones sample shaped like a sample of ``x``, in float64."""
    return torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)


def _input_streams(x: torch.Tensor, with_kernel: bool) -> StreamValues:
    """A sees ``x``, B ``x * x``, C one all-ones sample (px-spec.md section 2). C's input
    requires grad so that autograd records the fused layers' backward from the first."""
    c = None
    if with_kernel:
        c = _kernel_input(x).requires_grad_()
    return StreamValues(x, x * x, 0, c, 0)


def _geometry(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Conv2d):
        return {"stride": module.stride, "padding": module.padding}
    return {}


def _resolve(value: Any, env: dict) -> Any:
    return fx.node.map_arg(value, lambda n: env[n])


def _stream_args(args: Any, pick: Callable[[StreamValues], Any]) -> Any:
    """``args`` with every :class:`StreamValues` replaced by one of its streams."""
    return torch.utils._pytree.tree_map(
        lambda v: pick(v) if isinstance(v, StreamValues) else v, args,
        is_leaf=lambda v: isinstance(v, StreamValues),
    )


def _stream_values_in(args: Any) -> list[StreamValues]:
    leaves = torch.utils._pytree.tree_flatten(args, is_leaf=lambda v: isinstance(v, StreamValues))[0]
    return [v for v in leaves if isinstance(v, StreamValues)]


def _per_stream(fn: Callable, args: tuple, kwargs: dict) -> StreamValues:
    """``fn`` linear in its one stream argument, applied to each stream."""
    (t,) = _stream_values_in((args, kwargs))

    def call(pick):
        return fn(*_stream_args(args, pick), **_stream_args(kwargs, pick))

    with torch.no_grad():
        a, b = call(lambda v: v.a), call(lambda v: v.b)
    c = call(lambda v: v.c) if t.c is not None else None
    return StreamValues(a, b, t.b_exponent, c, t.c_exponent)


def _aligned(x: torch.Tensor, x_exponent: int, y: torch.Tensor, y_exponent: int) -> tuple:
    """``(larger, smaller, 2**(smaller's exponent - larger's), larger's exponent)``: the
    sum of two mantissas at the larger exponent is ``larger + factor * smaller``, one
    pass (the factor, a power of two, scales exactly)."""
    if x_exponent >= y_exponent:
        return x, y, math.ldexp(1.0, y_exponent - x_exponent), x_exponent
    return y, x, math.ldexp(1.0, x_exponent - y_exponent), y_exponent


def _aligned_kernel_sum(first: StreamValues, second: StreamValues) -> tuple[torch.Tensor | None, int]:
    """C's part of ``first + second`` (under autograd), or ``(None, 0)`` without C."""
    if first.c is None:
        return None, 0
    larger, smaller, factor, exponent = _aligned(first.c, first.c_exponent, second.c, second.c_exponent)
    return torch.add(larger, smaller, alpha=factor), exponent


def _aligned_sum(first: StreamValues, second: StreamValues) -> StreamValues:
    """``first + second``: the B and C mantissas are brought to the larger exponent."""
    with torch.no_grad():
        a = first.a + second.a
        larger, smaller, factor, b_exponent = _aligned(first.b, first.b_exponent, second.b, second.b_exponent)
        b = torch.add(larger, smaller, alpha=factor)
    c, c_exponent = _aligned_kernel_sum(first, second)
    return StreamValues(a, b, b_exponent, c, c_exponent)


def _relu_streams(t: StreamValues) -> StreamValues:
    """A: ReLU; B: times A's gate; C: identity."""
    with torch.no_grad():
        gate = t.a > 0
        return StreamValues(torch.relu(t.a), t.b * gate, t.b_exponent, t.c, t.c_exponent, None, t.c_peak)


def _gated_streams(t: StreamValues, residual: StreamValues | None = None) -> StreamValues:
    """:func:`_relu_streams` of ``t`` (of ``t + residual`` if given) in one pass of the
    C++ kernel ``gate_streams``, which also measures A's ReLU input (checked against
    float32's safe range) and B's peak (the next layer's normalizing exponent)."""
    a_residual = b_residual = None
    b, b_exponent, factor, c, c_exponent = t.b, t.b_exponent, 1.0, t.c, t.c_exponent
    if residual is not None:
        a_residual = residual.a
        b, b_residual, factor, b_exponent = _aligned(t.b, t.b_exponent, residual.b, residual.b_exponent)
        c, c_exponent = _aligned_kernel_sum(t, residual)
    with torch.no_grad():
        a, b, a_peak, b_peak = gate_streams(t.a, b, a_residual, b_residual, factor)
    check_true_scale(a_peak, a.dtype)
    peak = math.frexp(b_peak)[1] if b_peak > 0 else None
    return StreamValues(a, b, b_exponent, c, c_exponent, peak, t.c_peak if residual is None else None)


def _norm_streams(norm: nn.Module, t: StreamValues) -> StreamValues:
    """Eval BatchNorm: ``x * scale + shift`` with the shift in each mantissa's units."""
    shape = (1, -1, *[1] * (t.a.dim() - 2))
    scale, shift = (v.reshape(shape) for v in _folded_norm(norm, t.a.dtype))
    with torch.no_grad():
        a = t.a * scale + shift
        b = t.b * scale + shift * math.ldexp(1.0, -t.b_exponent)
    c = None
    if t.c is not None:
        c_scale, c_shift = (v.reshape(shape) for v in _folded_norm(norm, t.c.dtype))
        c = t.c * c_scale + c_shift * math.ldexp(1.0, -t.c_exponent)
    return StreamValues(a, b, t.b_exponent, c, t.c_exponent)


def _run_kept(module: nn.Module, weight: PrunableWeight | None, t: StreamValues, masks,
              kernel_leaves: dict[str, torch.Tensor]) -> StreamValues:
    """A layer every stream runs with its own parameters (the classifier by default);
    C differentiates its masked weight as a leaf."""
    functional = F.linear if isinstance(module, nn.Linear) else F.conv2d
    extra = _conv_arguments(module) if isinstance(module, nn.Conv2d) else ()
    w = weight.param.detach() if weight is not None else module.weight.detach()
    if weight is not None and not is_all_ones(masks[weight.name]):
        w = w * masks[weight.name]
    bias = module.bias.detach() if module.bias is not None else None

    def layer(x, exponent, weight_value):
        scaled_bias = bias.to(x.dtype) * math.ldexp(1.0, -exponent) if bias is not None else None
        out = functional(x, weight_value, scaled_bias, *extra)
        shift = _normalizing_shift(out.detach(), None)
        return out * math.ldexp(1.0, -shift), exponent + shift

    with torch.no_grad():
        a = functional(t.a, w, bias, *extra)
        b, b_exponent = layer(t.b, t.b_exponent, w)
    c, c_exponent = None, 0
    if t.c is not None:
        leaf = w.double().requires_grad_()
        if weight is not None:
            kernel_leaves[weight.name] = leaf
        c, c_exponent = layer(t.c, t.c_exponent, leaf)
    return StreamValues(a, b, b_exponent, c, c_exponent)


def _conv_arguments(module: nn.Conv2d) -> tuple:
    return (module.stride, module.padding, module.dilation, module.groups)


def _run_between_layers(node: fx.Node, modules: dict[str, nn.Module], env: dict,
                        relu_streams: Callable[[StreamValues], StreamValues]) -> Any:
    """A node outside the layer groups (the kinds :func:`_classify` accepts); ReLUs run
    as ``relu_streams``."""
    args, kwargs = _resolve(node.args, env), _resolve(node.kwargs, env)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.ReLU):
            return relu_streams(args[0])
        if isinstance(module, _NORMALIZATIONS):
            return _norm_streams(module, args[0])
        if isinstance(module, nn.Dropout):  # off in every stream
            return args[0]
        return _per_stream(module, args, kwargs)
    target = node.target
    if node.op == "call_method":
        if target in _RELU_METHODS:
            return relu_streams(args[0])
        if target in _METADATA_METHODS:
            return getattr(args[0].a, target)(*args[1:], **kwargs)
        return _per_stream(lambda x, *rest, **kw: getattr(x, target)(*rest, **kw), args, kwargs)
    if target in _RELU_FUNCTIONS:
        return relu_streams(args[0])
    if target in _ADD_FUNCTIONS:
        return _aligned_sum(args[0], args[1])
    if target is F.dropout:  # off in every stream
        return args[0]
    return _per_stream(target, args, kwargs)


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"layer"``, ``"norm"``, ``"relu"`` or ``"other"`` for a supported node; raises
    :class:`UnsupportedByPlan` naming anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if type(module) in (nn.Linear, nn.Conv2d):
            return "layer"
        if isinstance(module, _NORMALIZATIONS):
            if module.running_mean is None:
                raise UnsupportedByPlan(f"'{node.target}' has no running statistics")
            return "norm"
        if type(module) is nn.ReLU:
            return "relu"
        if isinstance(module, _HOMOGENEOUS_MODULES):
            return "other"
        raise UnsupportedByPlan(f"module '{node.target}' ({type(module).__name__})")
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target in _ADD_FUNCTIONS and not node.kwargs and len(node.args) == 2:
            if all(isinstance(a, fx.Node) for a in node.args):
                return "other"
            raise UnsupportedByPlan("an addition of a constant to a stream value")
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return "other"
        raise UnsupportedByPlan(f"function {getattr(node.target, '__name__', node.target)}")
    if node.op == "call_method":
        if node.target in _RELU_METHODS:
            return "relu"
        if node.target in _HOMOGENEOUS_METHODS | _METADATA_METHODS:
            return "other"
        raise UnsupportedByPlan(f"method .{node.target}()")
    if node.op in ("placeholder", "output"):
        return "other"
    raise UnsupportedByPlan(f"a graph node of kind {node.op} ({node.target})")


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _layer_fits_ops(module: nn.Module) -> str | None:
    """Why the fused ops cannot run this layer, or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1):
            return f"groups={module.groups}, dilation={module.dilation}"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    return None


def _is_kept(module_name: str, kept_modules: set[str]) -> bool:
    return any(module_name == k or module_name.startswith(k + ".") for k in kept_modules)


# Inside :func:`plans_reused`: the plans of models scored before, with the structure they
# were traced from. Tracing takes ~7 ms on ResNet-20 (5% of a px_scores call) and an
# iterative prune scores one model 100 times. Only there: a trace also fixes the branches
# a forward takes on Python state (``if self.mode == ...``), which no key can see, and
# the prune loop is the one place where nothing changes the model between calls.
_PLANS: weakref.WeakKeyDictionary | None = None


@contextlib.contextmanager
def plans_reused() -> Iterator[None]:
    """Within the block, :func:`cached_plan` reuses the plan of a model it traced before
    while the model's modules, parameters, buffers and hooks are the same objects."""
    global _PLANS
    outer = _PLANS
    _PLANS = weakref.WeakKeyDictionary() if outer is None else outer
    try:
        yield
    finally:
        _PLANS = outer


def _structure(model: nn.Module, kept_modules: set[str], backend: str) -> tuple:
    """What a plan depends on besides parameter values, as a comparable key: each module
    with its forward, hooks and the identities of its own parameters and buffers, from
    one walk of the modules (a prune computes it every round)."""
    return (
        backend, tuple(sorted(kept_modules)),
        tuple((name, id(m), type(m).forward, m.__dict__.get("forward"), len(m._forward_hooks),
               len(m._forward_pre_hooks), tuple((k, id(t)) for k, t in m._parameters.items()),
               tuple((k, id(t)) for k, t in m._buffers.items())) for name, m in model.named_modules()),
    )


def reusing_plans() -> bool:
    """Whether the caller is inside :func:`plans_reused`."""
    return _PLANS is not None


def cached_plan(model: nn.Module, weights: list[PrunableWeight], kept_modules: set[str], backend: str) -> FusedPlan:
    """:func:`build_plan`, or inside :func:`plans_reused` the plan of an earlier call on
    the same unchanged model."""
    if _PLANS is None:
        return build_plan(model, weights, kept_modules, backend)
    key = _structure(model, kept_modules, backend)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = build_plan(model, weights, kept_modules, backend)
    _PLANS[model] = (key, plan)
    return plan


def _check_no_hooks(model: nn.Module) -> None:
    """Tracing does not run module hooks, so a model with any (besides the mask hooks of
    ``torch.nn.utils.prune``, whose masks the plan applies itself) runs on the stream path."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise UnsupportedByPlan("global module forward hooks")
    for name, module in model.named_modules():
        pre_hooks = [h for h in module._forward_pre_hooks.values() if not isinstance(h, BasePruningMethod)]
        if module._forward_hooks or pre_hooks:
            raise UnsupportedByPlan(f"forward hooks on module '{name}'")


def build_plan(
    model: nn.Module,
    weights: Iterable[PrunableWeight],
    kept_modules: set[str],
    backend: str,
) -> FusedPlan:
    """The fused plan of ``model``; raises :class:`UnsupportedByPlan` with the reason
    when the model has something it does not run."""
    from pxkern.ops.px_conv2d import px_conv2d_backward, px_conv2d_forward
    from pxkern.ops.px_linear import px_linear_backward, px_linear_forward

    _check_no_hooks(model)
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001  (any tracing failure means: not fusible)
        raise UnsupportedByPlan(f"torch.fx cannot trace the forward ({type(error).__name__}: {error})") from error
    modules = dict(traced.named_modules())
    by_module = {w.module_name: w for w in weights}
    groups, absorbed, kept, seen = {}, set(), {}, set()
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedByPlan(f"the forward takes {len(placeholders)} inputs, the plan one")
    for node in traced.graph.nodes:
        kind = _classify(node, modules)
        if kind != "layer" or node in absorbed:
            continue
        module = modules[node.target]
        if node.target in seen:
            raise UnsupportedByPlan(f"layer '{node.target}' is called more than once")
        seen.add(node.target)
        if _is_kept(node.target, kept_modules) or node.target not in by_module:
            kept[node] = by_module.get(node.target)
            continue
        reason = _layer_fits_ops(module)
        if reason is not None:
            raise UnsupportedByPlan(f"layer '{node.target}' has {reason}")
        if backend == "cpp" and not isinstance(module, nn.Conv2d):
            # The stream path runs pruned Linear layers on the block-sparse kernels.
            raise UnsupportedByPlan(f"layer '{node.target}' ({type(module).__name__}) on the CPU")
        members = [node]
        norm = None
        follower = _only_user(node)
        if follower is not None and _classify(follower, modules) == "norm":
            norm = modules[follower.target]
            members.append(follower)
            follower = _only_user(follower)
        relu = follower is not None and _classify(follower, modules) == "relu"
        if relu:
            members.append(follower)
        conv = isinstance(module, nn.Conv2d)
        ops = (px_conv2d_forward, px_conv2d_backward) if conv else (px_linear_forward, px_linear_backward)
        groups[members[-1]] = LayerGroup(by_module[node.target], module, node.args[0], norm, relu, ops)
        absorbed.update(members)
    gated_sums = _residual_adds_before_relus(traced.graph, modules, absorbed) if backend == "cpp" else {}
    absorbed.update(gated_sums.values())
    gated_adds = set(gated_sums.values())
    for node, group in groups.items():
        group.b_peak_needed = not (node.users and set(node.users) <= gated_adds)
    return FusedPlan(traced.graph, modules, groups, absorbed, kept, backend, gated_sums)


def _residual_adds_before_relus(graph: fx.Graph, modules: dict[str, nn.Module],
                                absorbed: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """ReLU node -> the addition of two stream values that only it uses (the end of a
    residual block), for the plan to run both in one pass."""
    found = {}
    for node in graph.nodes:
        if node in absorbed or _classify(node, modules) != "relu":
            continue
        add = node.args[0] if node.args else None
        if (isinstance(add, fx.Node) and add.op == "call_function" and add.target in _ADD_FUNCTIONS
                and add not in absorbed and _only_user(add) is node and not add.kwargs
                and len(add.args) == 2 and all(isinstance(a, fx.Node) for a in add.args)):
            found[node] = add
    return found
