"""Evaluate a stock model in PX stream A, B or C (px-spec.md section 2).

Nothing of the model is copied or rewritten: each stream is one ``functional_call`` with
substituted parameters, under a ``TorchFunctionMode`` that
- catches every spelling of ReLU/LeakyReLU (``nn.ReLU(inplace=True)``, ``F.relu``,
  ``torch.relu``, ``Tensor.relu``, ``relu_``, ...) and applies the stream's rule: A records
  the gate ``input > 0``, B multiplies by the recorded gate, C is the identity;
- refuses activations the method does not cover, naming the module that calls them;
- carries every value of stream B as a power-of-two scaled mantissa (``scaled.py``);
  streams A (the model's own forward, whose gates are all the others use) and C (float64)
  run in true scale unless a value leaves a safe range (``run_gates``, and C in
  :mod:`pxkern.px.scores`), and are then run again scaled;
- routes convolutions and linear layers of streams A and B to cheaper kernels where the
  weight's structure allows (all-ones weights of B, pruned weights of later rounds; see
  ``kernel_for``).
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from pxkern.backend import choose_backend
from pxkern.evaluation import set_mode
from pxkern.ops.bsr_dense_mm import bsr_linear
from pxkern.ops.bsr_px_scores import bsr_px_scores
from pxkern.ops.relu_gate import relu_gate
from pxkern.ops.sparse_conv2d import prefer_sparse_conv2d, sparse_conv2d
from pxkern.px.folding import FOLDABLE_OPS, FoldingRecorder, FoldingRunner, FoldMismatch, FoldPlan, new_folding
from pxkern.px.scaled import (
    WEIGHTED_OPS,
    Exponents,
    ScaledArithmetic,
    empty_in_stream_layout,
    largest_magnitude,
    op_name,
)
from pxkern.sparse.format import BlockSparseMatrix
from pxkern.sparse.sparsify import UNMEASURED_MAX_BLOCK_DENSITY, choose_blocks
from pxkern.weights import PrunableWeight, is_all_ones

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)

RELU_OPS = frozenset({"relu", "relu_", "leaky_relu", "leaky_relu_"})

UNSUPPORTED_ACTIVATIONS = frozenset(
    {"sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "silu_", "elu", "elu_",
     "selu", "selu_", "celu", "celu_", "softplus", "hardtanh", "hardtanh_", "relu6",
     "hardswish", "hardsigmoid", "mish", "softmax", "log_softmax", "softmin",
     "softsign", "tanhshrink", "logsigmoid", "glu", "prelu", "rrelu", "rrelu_",
     "threshold", "threshold_", "hardshrink", "softshrink"}
)


# Stream C runs in float64 whatever the data streams use: with a kept signed classifier,
# the gradients of early layers are sums of terms that cancel to 1e-3 or less of their
# size (measured on VGG-16-bn with 10% masks: float32 C gave 2e-3 relative error per layer,
# float64 C 1e-7), and C costs one sample, so float64 is nearly free.
KERNEL_DTYPE = torch.float64

# Streams A and C run in true scale while the magnitude of every ReLU input and of the
# output stays in [2**-r, 2**r] with r = TRUE_SCALE_RANGE[dtype]: far from the dtype's
# limits (2**+-126 for float32, 2**+-1022 for float64) for the ops between two ReLUs, and
# never left by ordinary networks.
TRUE_SCALE_RANGE = {torch.float32: 64, torch.float64: 512}


class Stream(enum.Enum):
    GATES = "A"  # the model as it is, masked: records ReLU gates
    PATHS = "B"  # path activations: unit weights, input X*X, gated by A
    KERNEL = "C"  # path kernel: squared weights, all-ones input, linear


class UnsupportedActivationError(TypeError):
    """The model uses an activation outside the ReLU family, which PX does not define."""


class LeftTrueScale(ArithmeticError):
    """A value of a stream run in true scale left the safe range (TRUE_SCALE_RANGE)."""


def check_true_scale(peak: float, dtype: torch.dtype) -> None:
    """Raises LeftTrueScale unless ``peak`` (a largest magnitude) is 0 or in the range of
    ``dtype``."""
    if not math.isfinite(peak) or (peak > 0 and abs(math.frexp(peak)[1]) > TRUE_SCALE_RANGE[dtype]):
        raise LeftTrueScale()


@dataclass
class StreamState:
    """What one stream evaluation reads and writes besides the model."""

    stream: Stream
    exponents: Exponents
    # A's ``1[input > 0]`` in the stream dtype: a float multiply is several times faster
    # than any masking by a bool tensor on the CPU.
    gates: list[torch.Tensor] = field(default_factory=list)
    ones_weights: set[int] = field(default_factory=set)  # ids of all-ones B weights
    # ids of pruned Linear weights of A and B -> their block-sparse form
    block_sparse: dict[int, BlockSparseMatrix] = field(default_factory=dict)
    # ids of C's stand-in weights of those layers -> their block-sparse C layer
    kernel_layers: dict[int, BlockSparseKernelLayer] = field(default_factory=dict)
    # Streams A and C: run in true scale, with no exponents (see TRUE_SCALE_RANGE).
    true_scale: bool = False


def _relu_arguments(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, bool]:
    """(input, negative slope, in place) of any ReLU/LeakyReLU spelling."""
    x = args[0]
    leaky = name.startswith("leaky")
    slope = (args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)) if leaky else 0.0
    inplace_position = 2 if leaky else 1
    inplace = name.endswith("_") or bool(
        args[inplace_position] if len(args) > inplace_position else kwargs.get("inplace", False)
    )
    return x, slope, inplace


def _ones_weight_conv(func: Callable, spatial_dims: int) -> Callable:
    """Convolution with an all-ones weight: every output channel of a group is the same
    box filter of that group's input channel sum, computed once and broadcast."""

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        n, channels = x.shape[:2]
        out_channels = weight.shape[0]
        summed = x.reshape(n, groups, channels // groups, *x.shape[2:]).sum(2)
        box = torch.ones(groups, 1, *weight.shape[2:], dtype=x.dtype, device=x.device)
        y = func(summed, box, None, stride, padding, dilation, groups)
        y = y.unsqueeze(2).expand(n, groups, out_channels // groups, *y.shape[2:])
        y = y.reshape(n, out_channels, *y.shape[3:]) if groups > 1 else y[:, 0]
        if bias is not None:
            y = torch.add(y, bias.reshape(1, -1, *([1] * spatial_dims)), out=empty_in_stream_layout(y))
        return y

    return conv


def _ones_weight_linear(x, weight, bias=None):
    """``x @ ones^T``: every output is the row sum of ``x``."""
    y = x.sum(-1, keepdim=True).expand(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def _fields(matrix: BlockSparseMatrix) -> tuple:
    """The arguments the BSR ops take for ``matrix``."""
    return matrix.values, matrix.row_offsets, matrix.column_indices, list(matrix.shape)


def _block_sparse_linear(weight: BlockSparseMatrix) -> Callable:
    """``F.linear`` with the weight's block-sparse form (the C++ BSR kernel)."""

    def linear(x, _dense_weight, bias=None):
        return bsr_linear(*_fields(weight), x, bias)

    return linear


class BlockSparseKernelLayer:
    """Stream C of a block-pruned Linear layer, on its block-sparse float64 weight ``P``:
    the forward squares ``P`` in the BSR kernel's registers, and the backward gives the
    input gradient (the transposed product) and the layer's PX scores from the score
    epilogue (``pxkern::bsr_px_scores``): no weight-sized dense tensor in either."""

    def __init__(self, weight: BlockSparseMatrix) -> None:
        self.weight = weight
        self.scores: torch.Tensor | None = None  # |G| * P**2 at the stored blocks

    def linear(self, x: torch.Tensor, _stand_in: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _KernelThroughBlockSparse.apply(x, bias, self)

    def dense_scores(self) -> torch.Tensor:
        """The scores as a dense ``[M, K]`` tensor (zero outside the stored blocks)."""
        w = self.weight
        return BlockSparseMatrix(self.scores, w.row_offsets, w.column_indices, w.shape).to_dense()


class _KernelThroughBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer: BlockSparseKernelLayer):
        ctx.save_for_backward(x)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return bsr_linear(*_fields(layer.weight), x, bias, square_weight=True)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        layer.scores = bsr_px_scores(*_fields(layer.weight), grad, x)
        grad_x = bsr_linear(*_fields(layer.weight.transpose()), grad, square_weight=True)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def _block_sparse_forms(masked: torch.Tensor, mask: torch.Tensor) -> tuple[BlockSparseMatrix, ...]:
    """A pruned Linear weight (``masked``) and its mask as block-sparse matrices with the
    blocks of the mask, if a block size fits the mask's sparsity and keeps few enough
    blocks for the BSR product to beat the dense one; else ``()``."""
    choice = choose_blocks(mask, None)
    if choice is None:
        return ()
    block, kept = choice
    if float(kept.float().mean()) > UNMEASURED_MAX_BLOCK_DENSITY:
        return ()
    return tuple(BlockSparseMatrix.from_block_mask(m, block, kept) for m in (masked, mask))


_SPATIAL_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


def _conv_arguments(args: tuple, kwargs: dict) -> tuple:
    """(x, weight, stride, padding, dilation, groups) of an F.conv2d call."""
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    rest = [args[3 + i] if len(args) > 3 + i else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    return (args[0], args[1], *rest)


class StreamMode(TorchFunctionMode):
    """Applies one stream's rules to every torch call made by the model's forward."""

    def __init__(self, state: StreamState, module_names: Mapping[nn.Module, str],
                 folding: FoldingRecorder | FoldingRunner | None = None) -> None:
        super().__init__()
        self.state = state
        self.arithmetic = ScaledArithmetic(state.exponents)
        self.module_names = module_names
        self.module_stack: list[nn.Module] = []
        self.relu_calls = 0
        self.folding = folding

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        folding = self.folding
        if folding is None:
            return self.evaluate(func, name, args, kwargs)
        folded = folding.op(name, args, kwargs)
        if folded is not None:
            # The BatchNorm of a folded convolution: its output, as a new tensor object.
            exponent = self.state.exponents.of(folded)
            alias = folded.detach()
            return alias if exponent is None else self.state.exponents.tag(alias, exponent)
        if name in FOLDABLE_OPS:
            return folding.convolution(lambda a, k: self.evaluate(func, name, a, k), args, kwargs)
        return self.evaluate(func, name, args, kwargs)

    def evaluate(self, func: Callable, name: str, args: tuple, kwargs: dict):
        """One op under the stream's rules."""
        if name in RELU_OPS:
            return self.activation(name, args, kwargs)
        if name in UNSUPPORTED_ACTIVATIONS:
            raise UnsupportedActivationError(
                f"{self.where()} calls `{name}`: PX scores are defined for ReLU and LeakyReLU "
                f"activations only (nn.ReLU, nn.LeakyReLU, F.relu, torch.relu, Tensor.relu "
                f"and their in-place forms)"
            )
        if self.state.true_scale:
            if name in WEIGHTED_OPS:
                return self.kernel_for(func, name, args, kwargs)(*args, **kwargs)
            return func(*args, **kwargs)
        exponents = self.state.exponents
        if not exponents.any_tagged(args, kwargs):
            return func(*args, **kwargs)
        if name in WEIGHTED_OPS:
            return self.arithmetic.weighted(func, args, kwargs, self.kernel_for(func, name, args, kwargs))
        return self.arithmetic(func, args, kwargs)

    def where(self) -> str:
        if not self.module_stack:
            return "the model's forward"
        module = self.module_stack[-1]
        return f"module '{self.module_names.get(module, '?')}' ({type(module).__name__})"

    def activation(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        x, slope, inplace = _relu_arguments(name, args, kwargs)
        exponents = self.state.exponents
        exponent = exponents.of(x)
        stream = self.state.stream
        if stream is Stream.KERNEL:
            if self.state.true_scale:
                check_true_scale(largest_magnitude([x]), x.dtype)
            return x
        if stream is Stream.GATES:
            y, gate, peak = relu_gate(x, slope, inplace)
            if self.state.true_scale:
                check_true_scale(peak, x.dtype)
            self.state.gates.append(gate)
        else:
            # Each gate is read once: writing the product into it spares an allocation
            # (and its page faults) per ReLU.
            gate = self.next_gate(x)
            y = x.mul_(gate) if inplace else gate.mul_(x)
        return exponents.tag(y, exponent) if exponent is not None else y

    def next_gate(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.state.gates
        if self.relu_calls >= len(gates) or gates[self.relu_calls].shape != x.shape:
            raise RuntimeError(
                f"{self.where()} makes ReLU call {self.relu_calls} on a tensor of shape "
                f"{tuple(x.shape)} in stream B, which stream A did not make: PX needs a "
                f"forward whose structure does not depend on parameter values"
            )
        gate = gates[self.relu_calls]
        gates[self.relu_calls] = None  # consumed: B reuses its memory
        self.relu_calls += 1
        return gate

    def kernel_for(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Callable:
        """The cheapest kernel for a weighted op of streams A and B, which need no
        gradients: a box filter for all-ones weights, the direct sparse convolution for
        pruned ones (later pruning rounds), else the op itself."""
        if self.state.stream is Stream.KERNEL:
            layer = self.state.kernel_layers.get(id(args[1])) if name == "linear" else None
            return layer.linear if layer is not None else func
        if self.state.stream is Stream.PATHS and id(args[1]) in self.state.ones_weights:
            if name == "linear":
                return _ones_weight_linear
            if name in _SPATIAL_DIMS:
                return _ones_weight_conv(func, _SPATIAL_DIMS[name])
        if name == "linear" and id(args[1]) in self.state.block_sparse:
            return _block_sparse_linear(self.state.block_sparse[id(args[1])])
        if name == "conv2d" and prefer_sparse_conv2d(*_conv_arguments(args, kwargs)):
            return sparse_conv2d
        return func

    @contextlib.contextmanager
    def tracking_modules(self) -> Iterator[None]:
        """Know which module runs, to name it in errors (global hooks, removed after)."""

        def enter(module, _inputs):
            self.module_stack.append(module)

        def leave(module, _inputs, _output):
            if self.module_stack and self.module_stack[-1] is module:
                self.module_stack.pop()

        pre = nn.modules.module.register_module_forward_pre_hook(enter)
        post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
        try:
            yield
        finally:
            pre.remove()
            post.remove()


@dataclass
class StreamParameters:
    """The parameter values each stream substitutes, keyed like ``named_parameters``."""

    gates: dict[str, torch.Tensor]
    paths: dict[str, torch.Tensor]
    kernel: dict[str, torch.Tensor]
    # user weight name -> the leaf C differentiates, or the layer's block-sparse C layer
    kernel_weights: dict[str, torch.Tensor | BlockSparseKernelLayer]
    ones_weights: set[int]
    block_sparse: dict[int, BlockSparseMatrix]  # see StreamState
    kernel_layers: dict[int, BlockSparseKernelLayer]  # see StreamState


def kept_parameter_names(model: nn.Module, keep: tuple[str, ...]) -> set[str]:
    """Parameters every stream uses as they are: those of normalization layers and of
    the modules named in ``keep`` (with their submodules)."""
    modules = dict(model.named_modules())
    unknown = sorted(set(keep) - set(modules))
    if unknown:
        raise KeyError(f"keep names modules the model does not have: {unknown}")
    kept = set()
    for name in keep:
        kept.update(p for p, _ in modules[name].named_parameters(prefix=name))
    for name, module in modules.items():
        if isinstance(module, NORM_TYPES):
            kept.update(p for p, _ in module.named_parameters(prefix=name, recurse=False))
    return kept


def stream_parameters(
    model: nn.Module,
    weights: list[PrunableWeight],
    masks: Mapping[str, torch.Tensor],
    kept: set[str],
    dtype: torch.dtype,
) -> StreamParameters:
    """Parameter substitutions of streams A, B (in ``dtype``) and C (in float64;
    see ``KERNEL_DTYPE``), px-spec.md section 2."""
    by_param = {w.param_name: w for w in weights}
    gates, paths, kernel, kernel_weights, ones, block_sparse, kernel_layers = {}, {}, {}, {}, set(), {}, {}
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        p = param.detach().to(dtype)
        is_kept = name in kept
        prunable = by_param.get(name)
        if prunable is not None:
            mask = masks[prunable.name].to(dtype)
            unmasked = is_all_ones(mask)
            masked = p if unmasked else p * mask
            gates[name] = masked
            paths[name] = masked if is_kept else mask
            if unmasked and not is_kept:
                ones.add(id(mask))
            runs_sparse = not unmasked and not is_kept and _runs_block_sparse(prunable)
            forms = _block_sparse_forms(masked, mask) if runs_sparse else ()
            if forms:
                block_sparse[id(masked)], block_sparse[id(mask)] = forms
                # C gets a stand-in (no memory) that routes the layer to its BSR form.
                stand_in = torch.zeros((), dtype=KERNEL_DTYPE, device=p.device).expand(p.shape)
                layer = BlockSparseKernelLayer(forms[0].to(KERNEL_DTYPE))
                kernel[name], kernel_weights[prunable.name] = stand_in, layer
                kernel_layers[id(stand_in)] = layer
                continue
            # C's copy (fresh: squared in place) from the masked weight in the parameter's
            # own precision; the products with a 0/1 mask are exact.
            exact = masked if p.dtype == param.dtype else param.detach() * mask.to(param.dtype)
            masked_kernel = exact.to(KERNEL_DTYPE, copy=True)
            leaf = (masked_kernel if is_kept else masked_kernel.square_()).requires_grad_()
            kernel[name] = leaf
            kernel_weights[prunable.name] = leaf
        elif is_kept:
            gates[name] = paths[name] = p
            kernel[name] = param.detach().to(KERNEL_DTYPE)
        else:
            gates[name] = p
            paths[name] = torch.ones((), dtype=dtype, device=p.device).expand(p.shape)
            kernel[name] = param.detach().to(KERNEL_DTYPE, copy=True).square_()
    return StreamParameters(gates, paths, kernel, kernel_weights, ones, block_sparse, kernel_layers)


def _runs_block_sparse(weight: PrunableWeight) -> bool:
    """Pruned weights of plain Linear layers on the CPU run through the C++ BSR kernel
    in streams A and B (later pruning rounds, block-pruned MLPs and transformers)."""
    return (type(weight.module) is nn.Linear
            and choose_backend("bsr_linear", weight.param.device, implemented=("cpp", "torch")) == "cpp")


def run_stream(
    model: nn.Module,
    state: StreamState,
    x: torch.Tensor,
    parameters: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    bn: str,
    folding: FoldingRecorder | FoldingRunner | None = None,
) -> tuple[torch.Tensor, int]:
    """One forward of ``model`` in ``state.stream``; returns the output's mantissa and
    exponent. ``x`` is the stream's input in true scale. ``folding``: BatchNorms folded
    into convolutions, or learned (:mod:`pxkern.px.folding`), over ``{**parameters,
    **buffers}``."""
    # The official code records gates in eval mode, also when B and C use batch statistics.
    set_mode(model, batch_statistics=bn == "batch" and state.stream is not Stream.GATES)
    module_names = {m: name for name, m in model.named_modules()}
    mode = StreamMode(state, module_names, folding)
    if not state.true_scale:
        x = state.exponents.start(x)
    with mode.tracking_modules(), mode:
        output = functional_call(model, {**parameters, **buffers}, (x,), tie_weights=True, strict=False)
    if folding is not None:
        folding.finish()
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned a {type(output).__name__}: PX scoring needs a "
            f"model whose forward returns one tensor"
        )
    if state.true_scale:
        check_true_scale(largest_magnitude([output]), output.dtype)
    if state.stream is Stream.PATHS and mode.relu_calls != len(state.gates):
        raise RuntimeError(
            f"stream B made {mode.relu_calls} ReLU calls, stream A {len(state.gates)}: PX needs "
            f"a forward whose structure does not depend on parameter values"
        )
    exponent = state.exponents.of(output)
    return output, 0 if exponent is None else exponent


def run_gates(
    model: nn.Module,
    x: torch.Tensor,
    parameters: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    block_sparse: dict[int, BlockSparseMatrix],
    plan: FoldPlan | None,
) -> tuple[list[torch.Tensor], FoldPlan]:
    """Stream A's gates, and the BatchNorm folding plan for this model.

    A is first run as the model's own forward, in true scale and without exponent
    bookkeeping on every op; if a ReLU input or the output leaves
    ``TRUE_SCALE_RANGE`` (or is not finite), as in very deep
    nets whose activations shrink or grow layer after layer, A is run again with
    power-of-two scaled values, which keep every gate exact at any depth.

    Eval BatchNorms fold into the convolutions before them as ``plan`` says; without a
    plan, or if the forward no longer fits it, A runs unfolded and learns the plan
    (:mod:`pxkern.px.folding`)."""
    try:
        return _gates(model, x, parameters, buffers, block_sparse, plan)
    except FoldMismatch:
        return _gates(model, x, parameters, buffers, block_sparse, None)


def _gates(model, x, parameters, buffers, block_sparse, plan) -> tuple[list[torch.Tensor], FoldPlan]:
    tensors = {**parameters, **buffers}
    folding = new_folding(plan, tensors)
    state = StreamState(Stream.GATES, Exponents(), true_scale=True, block_sparse=block_sparse)
    try:
        run_stream(model, state, x, parameters, buffers, "eval", folding)
    except LeftTrueScale:
        folding = new_folding(plan, tensors)
        state = StreamState(Stream.GATES, Exponents(), block_sparse=block_sparse)
        run_stream(model, state, x, parameters, buffers, "eval", folding)
    return state.gates, folding.result()
