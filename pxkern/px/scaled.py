"""Power-of-two scaled tensors: stream values that never overflow or underflow.

PX stream values grow like the product of the fan-ins along a path (B) or shrink like the
product of squared weights (C): plain float32 overflows at the depth of VGG-16 and float64
at a few hundred layers. Every stream tensor therefore travels as a mantissa ``m`` with a
power-of-two exponent ``e`` (the value is ``m * 2**e``) kept in a side table, and each op
maps exponents the way its math does:

- ops linear in one stream tensor (views, pooling, sums, products with plain tensors) keep
  the exponent;
- affine ops (convolution or linear with bias, BatchNorm in eval mode, ``x + 1``) rescale
  their additive constant by ``2**-e`` instead of scaling the stream tensor;
- ops that combine stream tensors (``a + b``, ``torch.cat``) align the exponents first;
- ``a * b`` and ``a @ b`` add them; normalizations with batch statistics reset them to 0;
- any other op sees the true values in float64, or raises if they do not fit.

Exponents are held constant under autograd: they are the same for every parameter value
near the evaluation point, so gradients through the mantissas are the true gradients
times one global power of two, which changes no ranking of scores.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

# Mantissas are renormalized only when their magnitude leaves [2**-RANGE, 2**RANGE]: one
# layer grows them by at most ~2**13 (fan-in 4608 with unit weights), so float32 keeps a
# wide margin while most layers skip the rescaling pass.
RENORMALIZE_RANGE = 20

# Measuring a magnitude costs a pass over the tensor, so it is done only after ops that
# can move magnitudes by unbounded factors: weighted ops (fan-in), products, reductions
# and the float64 fallback. The others change them by bounded factors: a sum of aligned
# operands at most doubles the larger, eval BatchNorm scales by its per-channel factor,
# and normalizations with batch statistics give values near 1.
MEASURED_HOMOGENEOUS_OPS = frozenset({"sum"})

# Ops that return metadata or non-numeric values: called as they are, nothing tagged.
METADATA_OPS = frozenset(
    {
        "size", "dim", "ndimension", "numel", "__len__", "stride", "is_contiguous",
        "data_ptr", "element_size", "is_floating_point", "is_complex", "storage_offset",
        "get_device", "__hash__", "requires_grad_", "retain_grad", "register_hook",
        "untyped_storage", "_is_view", "__contains__", "__format__", "__repr__",
    }
)

# Ops linear (degree 1) in their first argument, the stream tensor: exponent unchanged.
HOMOGENEOUS_OPS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "t", "contiguous", "clone", "squeeze", "unsqueeze", "__getitem__",
        "expand", "expand_as", "narrow", "chunk", "split", "unbind", "flip", "roll",
        "repeat", "movedim", "select", "to", "float", "double", "half", "bfloat16",
        "type_as", "detach", "__get__", "max_pool1d", "max_pool2d", "max_pool3d",
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "_max_pool1d", "_max_pool2d", "_max_pool3d", "avg_pool1d", "avg_pool2d",
        "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "_adaptive_max_pool1d", "_adaptive_max_pool2d", "_adaptive_max_pool3d",
        "mean", "sum", "amax", "pad", "interpolate", "upsample", "upsample_nearest",
        "pixel_shuffle", "pixel_unshuffle", "dropout", "dropout1d", "dropout2d",
        "dropout3d", "alpha_dropout", "feature_alpha_dropout", "identity",
    }
)

# Ops linear jointly in their operands: exponents aligned to the largest first.
JOINTLY_LINEAR_OPS = frozenset(
    {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__",
     "rsub", "sub_", "__isub__", "cat", "concat", "concatenate", "stack"}
)

# Ops whose exponent is the sum (mul, matmul) or difference (div) of their operands'.
PRODUCT_OPS = frozenset(
    {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "matmul", "__matmul__",
     "__rmatmul__", "mm", "bmm"}
)
QUOTIENT_OPS = frozenset({"div", "__truediv__", "div_", "__itruediv__", "true_divide"})

# Affine ops whose bias enters additively: (input, weight, bias, ...).
WEIGHTED_OPS = frozenset(
    {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
     "conv_transpose3d"}
)

# Normalizations over statistics of their own input: output exponent 0, eps rescaled.
SELF_NORMALIZING_OPS = frozenset({"layer_norm", "group_norm", "instance_norm", "rms_norm"})

INPLACE_OPS = frozenset({"add_", "__iadd__", "sub_", "__isub__", "mul_", "__imul__",
                         "div_", "__itruediv__"})


def op_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


class Exponents:
    """The side table of power-of-two exponents of the stream tensors of one evaluation."""

    def __init__(self) -> None:
        self._table: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def of(self, value: Any) -> int | None:
        if isinstance(value, torch.Tensor):
            return self._table.get(value)
        return None

    def any_tagged(self, args: tuple, kwargs: dict) -> bool:
        """Whether a stream value is among the arguments of a torch call. Runs on every
        call the model makes, so it looks at tensors and flat sequences directly and
        flattens only other containers."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                if value in self._table:
                    return True
            elif isinstance(value, (list, tuple)):
                if any(isinstance(v, torch.Tensor) and v in self._table for v in value):
                    return True
            elif isinstance(value, dict) and any(
                self.of(leaf) is not None for leaf in tree_flatten(value)[0]
            ):
                return True
        return False

    def tag(self, tensor: torch.Tensor, exponent: int) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            self._table[tensor] = exponent
        return tensor

    def tag_all(self, result: Any, exponent: int) -> Any:
        for leaf in tree_flatten(result)[0]:
            self.tag(leaf, exponent)
        return result

    def start(self, tensor: torch.Tensor) -> torch.Tensor:
        """Enter a stream value: a normalized mantissa, tagged."""
        return self.renormalize(tensor, 0)

    def renormalize(self, tensor: torch.Tensor, exponent: int, *, inplace: bool = False) -> torch.Tensor:
        """Tag ``tensor * 2**exponent``, first moving its magnitude near 1 if it drifted."""
        shift = magnitude_exponent(tensor)
        if shift is not None and abs(shift) > RENORMALIZE_RANGE:
            scale = math.ldexp(1.0, -shift)
            tensor = tensor.mul_(scale) if inplace else tensor * scale
            exponent += shift
        return self.tag(tensor, exponent)

    def true_value(self, value: Any, op: str) -> Any:
        """The true value of a stream tensor in float64 (plain values pass through)."""
        exponent = self.of(value)
        if exponent is None:
            return value
        if exponent > 1000 or exponent < -1000:
            raise OverflowError(
                f"pxkern cannot evaluate `{op}` on a PX stream value of magnitude 2**{exponent}: "
                f"it is outside float64's range and `{op}` has no exponent rule. Supported ops "
                f"are linear, convolution, normalization, pooling, residual add/cat and views."
            )
        return value.double() * math.ldexp(1.0, exponent)


class ScaledSum:
    """A float64 running sum of power-of-two scaled tensors (the data vector ``v``)."""

    def __init__(self) -> None:
        self.mantissa: torch.Tensor | None = None
        self.exponent = 0

    def add(self, mantissa: torch.Tensor, exponent: int) -> None:
        mantissa = mantissa.double()
        if self.mantissa is None:
            self.mantissa, self.exponent = mantissa, exponent
            return
        common = max(self.exponent, exponent)
        self.mantissa = (self.mantissa * math.ldexp(1.0, self.exponent - common)
                         + mantissa * math.ldexp(1.0, exponent - common))
        self.exponent = common

    def direction(self) -> torch.Tensor:
        """The sum divided by its largest magnitude: a cotangent whose scale changes no
        ranking of scores (R is linear in it)."""
        peak = self.mantissa.abs().max()
        return self.mantissa / peak if peak > 0 else self.mantissa


# Tensors with fewer elements than this are measured together, one concatenation per
# dtype: px_scores checks ~100 parameters and buffers of a ResNet-20 per call, where
# one reduction each cost ~2 ms in per-call overhead.
_GATHERED_NUMEL = 1 << 16


def largest_magnitude(tensors: Iterable[torch.Tensor]) -> float:
    """``max |t|`` over all ``tensors``: 0 if they are empty, NaN if any holds a NaN."""
    tensors = [t.detach() for t in tensors if t.numel()]
    small: dict[torch.dtype, list[torch.Tensor]] = {}
    large = []
    for t in tensors:
        if t.dim() == 0:  # a peak one op already measured
            large.append(t)
        elif len(tensors) > 1 and t.numel() < _GATHERED_NUMEL:
            small.setdefault(t.dtype, []).append(t.reshape(-1))
        else:
            large.append(t)
    peak = 0.0
    for t in [*(torch.cat(group) for group in small.values()), *large]:
        if t.dim() == 0:
            low = high = t.item()
        else:
            # aminmax reads a tensor once and allocates no |tensor| temporary; broadcast
            # (stride-0) dimensions are read once, not once per repeat.
            low, high = torch.aminmax(_broadcast_base(t))
            low, high = low.item(), high.item()
        # A NaN makes both extremes NaN, which the comparisons below would skip.
        if math.isnan(low) or math.isnan(high):
            return math.nan
        peak = max(peak, abs(low), abs(high))
    return peak


def largest_nonnegative(tensors: Iterable[torch.Tensor]) -> float:
    """``max t`` over tensors of values ``>= 0`` (scores): 0 if all are empty, NaN if any
    holds a NaN. One fused reduction over the list: 0.07 against 0.41 ms for
    :func:`largest_magnitude` on ResNet-20's 22 float64 score tensors."""
    tensors = [t.detach() for t in tensors if t.numel()]
    return torch.stack(torch._foreach_max(tensors)).max().item() if tensors else 0.0


def magnitude_exponent(tensor: torch.Tensor) -> int | None:
    """``r`` with ``max|tensor|`` in ``[2**(r-1), 2**r)``; None for empty or all-zero."""
    peak = largest_magnitude([tensor])
    if not math.isfinite(peak):
        raise FloatingPointError("a PX stream value is not finite before rescaling")
    if peak == 0:
        return None
    return math.frexp(peak)[1]


def _broadcast_base(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the repeats of its stride-0 (expanded) dimensions, as a dense
    view in memory order where it is one: reductions on a channels-last tensor would
    otherwise first copy it to the contiguous layout."""
    if tensor.is_contiguous():  # most calls (0-d peaks, weights): no view to work out
        return tensor.view(-1)
    index = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride())
    base = tensor[index]
    in_memory_order = base.permute(sorted(range(base.dim()), key=lambda d: -base.stride(d)))
    return in_memory_order.view(-1) if in_memory_order.is_contiguous() else base


def _scaled_constant(value: Any, exponent: int) -> Any:
    """An additive constant of an affine op, expressed in units of ``2**exponent``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        return value
    return value * math.ldexp(1.0, -exponent)


class _Signature:
    """Binds an op's arguments by parameter name (F.batch_norm, F.linear, ...)."""

    def __init__(self, func: Callable) -> None:
        self.signature = inspect.signature(func)

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound


_BATCH_NORM = _Signature(F.batch_norm)


def folded_batch_norm(running_mean, running_var, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as one per-channel ``(scale, shift)``: ``x * scale + shift``."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _channel_broadcast_batch_norm(input, running_mean, running_var, weight, bias, eps, **_) -> torch.Tensor:
    """Eval BatchNorm of an input that is the same in every channel (stride 0, as the
    all-ones weights of stream B make it): one broadcast ``scale * x + shift`` that reads
    the single channel, where BatchNorm's kernel would walk the expanded layout."""
    scale, shift = folded_batch_norm(running_mean, running_var, weight, bias, eps)
    shape = (1, -1, *[1] * (input.dim() - 2))
    out = empty_in_stream_layout(input)
    return torch.addcmul(shift.reshape(shape), input[:, :1], scale.reshape(shape), out=out)


def stream_layout(t: torch.Tensor) -> torch.memory_format:
    """The layout stream values travel in: images channels-last, since oneDNN convolutions
    run 20-30% faster on it on the CPU (measured on ResNet-20 and VGG-16 here) and every
    later op keeps it; anything else contiguous."""
    return torch.channels_last if t.dim() == 4 else torch.contiguous_format


def empty_in_stream_layout(like: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor shaped like ``like`` in :func:`stream_layout`: a result made
    from broadcast values must follow it, or every op after it reads across layouts at
    several times the cost."""
    layout = stream_layout(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=layout)


class ScaledArithmetic:
    """Evaluates one op on stream tensors, returning tagged results."""

    def __init__(self, exponents: Exponents) -> None:
        self.exponents = exponents

    def __call__(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        name = op_name(func)
        e = self.exponents
        if name in METADATA_OPS:
            return func(*args, **kwargs)
        if name in MEASURED_HOMOGENEOUS_OPS and e.of(args[0]) is not None:
            return e.renormalize(func(*args, **kwargs), e.of(args[0]))
        if name in HOMOGENEOUS_OPS and e.of(args[0]) is not None:
            return e.tag_all(func(*args, **kwargs), e.of(args[0]))
        if name in WEIGHTED_OPS:
            return self.weighted(func, args, kwargs, lambda *a, **k: func(*a, **k))
        if name == "batch_norm":
            return self.batch_norm(func, args, kwargs)
        if name in SELF_NORMALIZING_OPS:
            return self.self_normalizing(func, args, kwargs)
        if name in JOINTLY_LINEAR_OPS:
            return self.jointly_linear(func, name, args, kwargs)
        if name in PRODUCT_OPS or name in QUOTIENT_OPS:
            return self.product(func, name, args, kwargs)
        return self.fallback(func, name, args, kwargs)

    # Each rule below computes on mantissas and tags the result.

    def weighted(self, func: Callable, args: tuple, kwargs: dict, compute: Callable) -> Any:
        """``func(x, weight, bias, ...)`` with ``x`` a stream tensor: the bias is rescaled.
        ``compute`` receives the same arguments and may choose a faster kernel."""
        x, weight = args[0], args[1]
        exponent = self.exponents.of(x)
        if exponent is None or self.exponents.of(weight) is not None:
            return self.fallback(func, op_name(func), args, kwargs)
        args = list(args)
        if len(args) > 2:
            args[2] = _scaled_constant(args[2], exponent)
        elif "bias" in kwargs:
            kwargs = {**kwargs, "bias": _scaled_constant(kwargs["bias"], exponent)}
        return self.exponents.renormalize(compute(*args, **kwargs), exponent)

    def batch_norm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        bound = _BATCH_NORM.bind(args, kwargs)
        exponent = self.exponents.of(bound.arguments["input"])
        if exponent is None:
            return self.fallback(func, "batch_norm", args, kwargs)
        a = bound.arguments
        if a["training"]:
            # Batch statistics scale with the input: only eps does not, in units of 4**e.
            a["eps"] = a["eps"] * math.ldexp(1.0, -2 * exponent)
            out_exponent = 0
        else:
            a["running_mean"] = _scaled_constant(a["running_mean"], exponent)
            a["bias"] = _scaled_constant(a["bias"], exponent)
            out_exponent = exponent
            x = a["input"]
            if x.dim() > 1 and x.stride(1) == 0:
                return self.exponents.tag(_channel_broadcast_batch_norm(**a), out_exponent)
        return self.exponents.tag(func(*bound.args, **bound.kwargs), out_exponent)

    def self_normalizing(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        bound = _Signature(func).bind(args, kwargs)
        exponent = self.exponents.of(args[0])
        if exponent is None or "eps" not in bound.arguments:
            return self.fallback(func, op_name(func), args, kwargs)
        if bound.arguments["eps"] is not None:
            bound.arguments["eps"] = bound.arguments["eps"] * math.ldexp(1.0, -2 * exponent)
        return self.exponents.tag(func(*bound.args, **bound.kwargs), 0)

    def jointly_linear(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        operands = [*args[0]] if name in {"cat", "concat", "concatenate", "stack"} else list(args[:2])
        if "other" in kwargs:
            operands.append(kwargs["other"])
        exponents = [self.exponents.of(o) for o in operands]
        common = max(x for x in exponents if x is not None)

        def aligned(value: Any) -> Any:
            own = self.exponents.of(value)
            if own is None:
                return _scaled_constant(value, common)
            return value if own == common else value * math.ldexp(1.0, own - common)

        if name in INPLACE_OPS:
            target = args[0]
            own = self.exponents.of(target)
            if own is not None and own != common:
                target.mul_(math.ldexp(1.0, own - common))
            elif own is None:
                return self.fallback(func, name, args, kwargs)
            result = func(target, *[aligned(a) for a in args[1:]],
                          **{k: aligned(v) if k == "other" else v for k, v in kwargs.items()})
            return self.exponents.tag(result, common)
        if name in {"cat", "concat", "concatenate", "stack"}:
            result = func([aligned(t) for t in args[0]], *args[1:], **kwargs)
        else:
            result = func(*[aligned(a) for a in args[:2]], *args[2:],
                          **{k: aligned(v) if k == "other" else v for k, v in kwargs.items()})
        return self.exponents.tag_all(result, common)

    def product(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        first = self.exponents.of(args[0]) or 0
        second = self.exponents.of(args[1] if len(args) > 1 else kwargs.get("other")) or 0
        exponent = first - second if name in QUOTIENT_OPS else first + second
        result = func(*args, **kwargs)
        return self.exponents.renormalize(result, exponent, inplace=name in INPLACE_OPS)

    def fallback(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        """An op without an exponent rule: evaluate it on the true values in float64."""
        stream_dtypes = [a.dtype for a in tree_flatten((args, kwargs))[0]
                         if self.exponents.of(a) is not None]
        real_args, real_kwargs = tree_map(lambda v: self.exponents.true_value(v, name), (args, kwargs))
        result = func(*real_args, **real_kwargs)
        leaves = [leaf for leaf in tree_flatten(result)[0] if isinstance(leaf, torch.Tensor)]
        if any(leaf.is_floating_point() and not torch.isfinite(leaf).all() for leaf in leaves):
            raise OverflowError(
                f"pxkern evaluated `{name}` on true PX stream values and got inf/NaN: "
                f"this op has no exponent rule; see pxkern.px.scaled for the supported ops"
            )
        dtype = stream_dtypes[0]
        return tree_map(
            lambda v: self.exponents.start(v.to(dtype))
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
            result,
        )
