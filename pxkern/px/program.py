"""The fused plan on the CPU as one C++ call per scoring: ``pxkern::plan_scores``.

A scoring of the Python plan (:mod:`pxkern.px.fused`, backend ``"cpp"``) spends 13-22 ms
of a ResNet-20 round (B=128) in Python between its kernel calls: the plan's walk, the
layer ops' argument checks, the kernel-choice lookups, exponents and autograd's nodes for
stream C (``docs/prune-performance.md``, "The executor's budget, measured"). Here the
plan is lowered once per input shape to a program of instructions over value slots, and
``pxkern::plan_scores`` runs streams A, B and C forward and C's backward, the scores
coming out, in one call: the same kernels in the same order and precision, with every
step a transcription of the plan's (the C++ names its Python counterparts).

What stays in Python is what a round needs measured: each conv layer's mask density and
the kernels ``pxkern.ops.px_conv2d`` would choose at it (``known_forward_choices``,
``known_backward_choices``, under the ops' own keys). A choice not measured yet is
measured here, on zeros of the layer's input shapes and weights with the mask's zeros
(the kernels' times do not depend on the values), as the plan's ops would have measured
it; only a choice that stays unknown sends the round to the Python plan. (Leaving every
unmeasured level to the Python plan ran 45 of a prune's 100 rounds there: some layer
reaches a new density level most rounds.)

Programs cover conv layer groups, ReLUs (with the residual add before them), sums,
adaptive average and max pooling, flatten and a kept Linear classifier: the ResNets and
VGGs of :mod:`pxkern.models`. A plan with any other node runs in Python as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.profiler import record_function

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.ops.px_conv2d import (
    known_backward_choices,
    known_forward_choices,
    measure_forward_choices,
    px_conv2d_backward,
)
from pxkern.px.fused import PLAN_LABELS, FusedPlan, LayerGroup, UnsupportedByPlan
from pxkern.px.scaled import stream_layout
from pxkern.px.streams import TRUE_SCALE_RANGE, LeftTrueScale
from pxkern.weights import PrunableWeight, is_all_ones

__all__ = ["Program", "lower", "plan_raw_scores"]

# Opcodes of csrc/cpu/plan_scores/plan_scores.cpp; an instruction is WIDTH ints:
# [opcode, input slot, second input slot or -1, operands...]. Step s writes slot s + 1.
CONV, GATE, ADD, ADAPTIVE_AVG_POOL, FLATTEN, KEPT_LINEAR, MAX_POOL = 1, 2, 3, 4, 5, 6, 7
WIDTH = 9

_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_})
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_PASS_THROUGH = (nn.Identity, nn.Dropout)


@dataclass
class _ConvLayer:
    """A conv layer group of the program, with meta tensors shaped and laid out like its
    inputs, for the kernel choices' keys."""

    group: LayerGroup
    stride: list[int]
    padding: list[int]
    x: torch.Tensor  # A's and B's input
    h: torch.Tensor  # C's input
    g: torch.Tensor  # C's cotangent at the output

    def choices(self, count: int) -> list[int] | None:
        """The kernels ``px_conv2d`` chooses at a mask of ``count`` > 0 nonzeros, or None
        if any is not measured (see ``known_forward_choices``, ``known_backward_choices``)."""
        shape = self.group.weight.shape
        density = count / shape.numel()
        forward = known_forward_choices(self.x, self.h, shape, self.stride, self.padding, density)
        backward = known_backward_choices(self.g, self.h, shape, self.stride, self.padding, density)
        return None if forward is None or backward is None else [*map(int, forward), *map(int, backward)]

    def measure(self, mask: torch.Tensor, count: int) -> None:
        """Measures the kernel choices at ``mask`` (``count`` nonzeros) not measured yet,
        on zeros shaped like the layer's inputs (the kernels' times do not depend on the
        values), as ``px_conv2d`` would have measured them in the Python plan."""
        def zeros(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(like, device="cpu")

        h = zeros(self.h)
        density = count / mask.numel()
        with torch.no_grad():
            measure_forward_choices(zeros(self.x), h, mask, self.stride, self.padding, density)
            px_conv2d_backward(zeros(self.g), h, self.group.weight.param.detach(), mask, stride=self.stride,
                               padding=self.padding, backend="cpp")


@dataclass
class _Kept:
    """A layer run with its own parameters in every stream (the classifier), and its
    prunable weight if it has one."""

    module: nn.Linear
    weight: PrunableWeight | None


@dataclass
class Program:
    """A fused plan lowered for one batch shape and layout; see the module docstring."""

    instructions: list[int]
    geometry: list[int]
    layers: list[_ConvLayer]
    kept: list[_Kept]

    def choices(self, counts: list[int], masks: list[torch.Tensor]) -> list[int] | None:
        """The kernel choices of every conv layer at ``masks`` with ``counts`` nonzeros.
        A layer's choice not measured yet is measured here, on inputs of its shapes (the
        kernels' times do not depend on the values); None if one stays unknown."""
        found = []
        for layer, count, mask in zip(self.layers, counts, masks):
            if count == 0:  # pruned away: no kernel runs
                found += [1, 0, 0, 0, 0, 0, 0]
                continue
            choices = layer.choices(count)
            if choices is None:
                layer.measure(mask, count)
                choices = layer.choices(count)
            if choices is None:
                return None
            found += [0, *choices]
        return found

    def raw_scores(self, batches: list[torch.Tensor], masks: dict[str, torch.Tensor],
                   weights: list[PrunableWeight]) -> dict[str, torch.Tensor] | None:
        """:meth:`FusedPlan.raw_scores` in one C++ call, or None if a kernel choice stays
        unknown at these masks (the caller runs the Python plan)."""
        layer_masks = [masks[layer.group.weight.name] for layer in self.layers]
        counts = torch.stack([m.count_nonzero() for m in layer_masks]).tolist() if layer_masks else []
        choices = self.choices(counts, layer_masks)
        if choices is None:
            return None
        return self.run(batches, masks, weights, counts, choices)

    def arguments(self, batches: list[torch.Tensor], masks: dict[str, torch.Tensor], counts: list[int],
                  choices: list[int]) -> tuple:
        """``pxkern::plan_scores``' arguments: the layers' tensors at these masks (a
        conv layer's mask None where all ones) with the program and the choices."""
        layer_tensors = []
        for layer, count in zip(self.layers, counts):
            group = layer.group
            mask = masks[group.weight.name]
            bias = group.module.bias
            scale, shift = group.affine(torch.float64)
            layer_tensors += [group.weight.param.detach(), None if count == mask.numel() else mask,
                              None if bias is None else bias.detach(), scale, shift]
        kept_tensors = []
        for kept in self.kept:
            weight = kept.weight
            mask = None if weight is None or is_all_ones(masks[weight.name]) else masks[weight.name]
            bias = kept.module.bias
            kept_tensors += [(weight.param if weight is not None else kept.module.weight).detach(), mask,
                             None if bias is None else bias.detach()]
        return (batches, self.instructions, self.geometry, layer_tensors, kept_tensors, choices,
                TRUE_SCALE_RANGE[torch.float32])

    def run(self, batches: list[torch.Tensor], masks: dict[str, torch.Tensor], weights: list[PrunableWeight],
            counts: list[int], choices: list[int]) -> dict[str, torch.Tensor]:
        """The raw scores with the given mask counts of the conv layers and kernel
        choices (:meth:`choices`' layout)."""
        with record_function(PLAN_LABELS["program"]):
            scores, status = torch.ops.pxkern.plan_scores(*self.arguments(batches, masks, counts, choices))
        if status.item():
            raise LeftTrueScale()
        found = {layer.group.weight.name: s for layer, s in zip(self.layers, scores)}
        for kept, s in zip(self.kept, scores[len(self.layers):]):
            if kept.weight is not None:
                found[kept.weight.name] = s
        return {w.name: found[w.name] if w.name in found
                else torch.zeros(w.shape, dtype=torch.float64, device=w.param.device) for w in weights}


def plan_raw_scores(plan: FusedPlan, batches, masks: dict[str, torch.Tensor],
                    weights: list[PrunableWeight]) -> dict[str, torch.Tensor]:
    """``plan.raw_scores``, from its program where the plan lowers and the round's kernel
    choices are measured; from the Python plan otherwise. The batches are read into a
    list first (the program takes them in one call)."""
    batches = list(batches)
    if plan.backend == "cpp" and EXTENSION_AVAILABLE and batches:
        program = _program(plan, batches)
        if program is not None:
            scores = program.raw_scores(batches, masks, weights)
            if scores is not None:
                return scores
    return plan.raw_scores(batches, masks, weights)


def _program(plan: FusedPlan, batches: list[torch.Tensor]) -> Program | None:
    """The plan's program for these batches (all of one shape and layout), lowered on
    first use; None if the plan has a node no program runs."""
    first = batches[0]
    key = (tuple(first.shape), first.stride(), first.dtype)
    if any((tuple(x.shape), x.stride(), x.dtype) != key for x in batches[1:]):
        return None
    if key not in plan.programs:
        try:
            plan.programs[key] = lower(plan, first)
        except UnsupportedByPlan:
            plan.programs[key] = None
    return plan.programs[key]


def _meta(shape, dtype: torch.dtype, layout: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=layout)


@dataclass
class _Value:
    """A slot of the program while lowering, with stream A's and C's shapes."""

    slot: int
    a_shape: torch.Size
    c_shape: torch.Size


def lower(plan: FusedPlan, x: torch.Tensor) -> Program:
    """The program of ``plan`` for batches like ``x`` (float32, in the streams' layout);
    raises :class:`UnsupportedByPlan` naming a node it does not run."""
    if plan.backend != "cpp" or x.dtype != torch.float32 or x.dim() != 4:
        raise UnsupportedByPlan("programs run float32 image batches on the CPU plan")
    layout = stream_layout(x)
    instructions: list[int] = []
    geometry: list[int] = []
    layers: list[_ConvLayer] = []
    kept: list[_Kept] = []
    values: dict[fx.Node, _Value] = {}

    def emit(opcode: int, first: _Value, second: _Value | None = None, *operands: int) -> int:
        operands = [*operands, *[0] * (WIDTH - 3 - len(operands))]
        instructions.extend([opcode, first.slot, -1 if second is None else second.slot, *operands])
        return len(instructions) // WIDTH

    def per_stream(node: fx.Node, fn, opcode: int, *operands: int) -> _Value:
        t = values[node.args[0]]
        a = fn(torch.empty(t.a_shape, device="meta"))
        c = fn(torch.empty(t.c_shape, device="meta"))
        return _Value(emit(opcode, t, None, *operands), a.shape, c.shape)

    for node in plan.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or values[result].slot != len(instructions) // WIDTH:
                raise UnsupportedByPlan("an output that is not the last step's value")
            return Program(instructions, geometry, layers, kept)
        if node in plan.absorbed and node not in plan.groups:
            continue
        if node.op == "placeholder":
            values[node] = _Value(0, x.shape, torch.Size((1, *x.shape[1:])))
        elif node in plan.groups:
            group = plan.groups[node]
            t = values[group.layer_input]
            module = group.module
            if not isinstance(module, nn.Conv2d) or len(t.a_shape) != 4:
                raise UnsupportedByPlan(f"layer group {node.name} is not a convolution of images")
            stride, padding = list(module.stride), list(module.padding)
            out = [(size + 2 * p - k) // s + 1
                   for size, k, s, p in zip(t.a_shape[2:], module.kernel_size, stride, padding)]
            c_out = torch.Size((1, module.out_channels, *out))
            layers.append(_ConvLayer(group, stride, padding, _meta(t.a_shape, torch.float32, layout),
                                     _meta(t.c_shape, torch.float64, torch.contiguous_format),
                                     _meta(c_out, torch.float64, torch.contiguous_format)))
            geometry += [int(group.relu), int(group.b_peak_needed), *stride, *padding]
            slot = emit(CONV, t, None, len(layers) - 1)
            values[node] = _Value(slot, torch.Size((t.a_shape[0], *c_out[1:])), c_out)
        elif node in plan.kept:
            t = values[node.args[0]]
            module = plan.modules[node.target]
            if type(module) is not nn.Linear or len(t.a_shape) != 2:
                raise UnsupportedByPlan(f"kept layer {node.target} is not a Linear on flat features")
            kept.append(_Kept(module, plan.kept[node]))
            slot = emit(KEPT_LINEAR, t, None, len(kept) - 1)
            values[node] = _Value(slot, torch.Size((t.a_shape[0], module.out_features)),
                                  torch.Size((1, module.out_features)))
        elif node in plan.gated_sums:
            first, second = (values[a] for a in plan.gated_sums[node].args)
            values[node] = _Value(emit(GATE, first, second), first.a_shape, first.c_shape)
        else:
            values[node] = _lowered_node(node, plan, values, emit, per_stream)
    raise UnsupportedByPlan("the traced graph has no output")


def _lowered_node(node: fx.Node, plan: FusedPlan, values: dict, emit, per_stream) -> _Value:
    """A node between the layer groups as an instruction (or the value it passes on)."""
    kind, target = node.op, node.target
    module = plan.modules.get(target) if kind == "call_module" else None
    args = node.args
    if isinstance(module, _PASS_THROUGH) or (kind == "call_function" and target is F.dropout):
        return values[args[0]]
    relu = (type(module) is nn.ReLU or (kind == "call_function" and target in _RELU_FUNCTIONS)
            or (kind == "call_method" and target in ("relu", "relu_")))
    if relu:
        t = values[args[0]]
        return _Value(emit(GATE, t), t.a_shape, t.c_shape)
    if kind == "call_function" and target in _ADD_FUNCTIONS:
        first, second = values[args[0]], values[args[1]]
        return _Value(emit(ADD, first, second), first.a_shape, first.c_shape)
    if isinstance(module, nn.AdaptiveAvgPool2d) or (kind == "call_function" and target is F.adaptive_avg_pool2d):
        size = module.output_size if module is not None else (args[1] if len(args) > 1 else node.kwargs["output_size"])
        size = (size, size) if isinstance(size, int) else tuple(size)
        if None in size:
            raise UnsupportedByPlan(f"adaptive pooling to {size}")
        return per_stream(node, lambda v: F.adaptive_avg_pool2d(v, size), ADAPTIVE_AVG_POOL, *size)
    if type(module) is nn.MaxPool2d:
        pairs = [(v, v) if isinstance(v, int) else tuple(v)
                 for v in (module.kernel_size, module.stride, module.padding)]
        if module.dilation not in (1, (1, 1)) or module.ceil_mode or module.return_indices:
            raise UnsupportedByPlan(f"max pooling {module}")
        return per_stream(node, module, MAX_POOL, *pairs[0], *pairs[1], *pairs[2])
    start = _flatten_start(node, module)
    if start is not None:
        return per_stream(node, lambda v: torch.flatten(v, start), FLATTEN, start)
    raise UnsupportedByPlan(f"node {node.name} ({kind} {getattr(target, '__name__', target)})")


def _flatten_start(node: fx.Node, module: nn.Module | None) -> int | None:
    """The start dimension of a flatten to the end, or None for any other node."""
    if type(module) is nn.Flatten:
        return module.start_dim if module.end_dim == -1 else None
    is_flatten = ((node.op == "call_function" and node.target is torch.flatten)
                  or (node.op == "call_method" and node.target == "flatten"))
    if not is_flatten or len(node.args) > 2 or set(node.kwargs) - {"start_dim"}:
        return None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start if isinstance(start, int) and start >= 0 else None


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("pxkern::plan_scores")
    def _plan_scores_fake(batches, program, geometry, layers, kept, choices, true_scale_range):
        """Float64 scores shaped like each conv layer's weight, then each kept layer's;
        and the status."""
        weights = [*layers[::5], *kept[::3]]
        status = batches[0].new_empty((1,), dtype=torch.int64)
        return [w.new_empty(w.shape, dtype=torch.float64) for w in weights], status
