"""Eval BatchNorm folded into the convolution that feeds it, in streams A and B.

A convolution whose output goes only into a BatchNorm with running statistics is evaluated
as ``conv(x, W * s) + (b * s + t)``, with the BatchNorm's per-channel scale ``s`` and
shift ``t`` (architecture.md, the layer epilogue); the BatchNorm call then returns that
result. It saves the BatchNorm's pass over the activation, a read and a write of the
largest tensors of a CNN, in both data streams. Stream C (one sample, under autograd)
keeps its BatchNorms.

Which convolutions qualify is learned from the model's own forward, not from its source:
a :class:`FoldingRecorder` watches a stream that runs unfolded and keeps the
convolutions whose output tensor was used by exactly one op, a BatchNorm in eval mode,
and whose weight is used by one convolution call. The result, a :class:`FoldPlan` of
parameter names, is stable across calls, so stream A of later calls on the same model
uses it from the start (``plan_for``): the rounds of a prune. A convolution whose weight is
computed in the forward (``weight_orig * weight_mask`` of ``torch.nn.utils.prune``) is not
folded: its weight is none of the stream's tensors. Folding is skipped where scaling the
weight would cost more than the BatchNorm's pass (``_folding_pays``).

A plan is checked while it is used (:class:`FoldingRunner`). A folded output must reach
its BatchNorm (the same running statistics, weight, bias and eps the plan folded) before
any other op touches it, and no op may touch it afterwards: the BatchNorm's result is a
separate tensor object (an alias), so a later use of the raw convolution output is seen.
Any deviation, as when a model's forward changed since the plan was learned, raises
:class:`FoldMismatch` and the caller evaluates the stream unfolded.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from pxkern.px.scaled import METADATA_OPS, folded_batch_norm

__all__ = ["FOLDABLE_OPS", "FoldMismatch", "FoldPlan", "FoldingRecorder", "FoldingRunner",
           "new_folding", "plan_for", "remember_plan"]

# Convolutions: the weight's first dimension is the output channel, which is BatchNorm's
# channel dimension 1 of the output. (A Linear layer on [N, L, C] inputs would normalize L.)
FOLDABLE_OPS = frozenset({"conv1d", "conv2d", "conv3d"})

_CONV_ARGUMENTS = ("input", "weight", "bias")
_BATCH_NORM_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                         "momentum", "eps")


def _eps(bound: dict[str, Any]) -> float:
    """The eps of a bound ``batch_norm`` call (F.batch_norm's default if not given)."""
    return float(bound.get("eps", 1e-5))


class FoldMismatch(RuntimeError):
    """The forward did not use a folded convolution's output as the plan says."""


@dataclass(frozen=True)
class FoldedNorm:
    """The eval BatchNorm after one convolution, by the names of its stream tensors."""

    running_mean: str
    running_var: str
    weight: str | None
    bias: str | None
    eps: float


@dataclass(frozen=True)
class FoldPlan:
    """Convolution weight name -> the BatchNorm folded into that convolution."""

    norms: Mapping[str, FoldedNorm]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(model: torch.nn.Module) -> FoldPlan | None:
    """The plan last learned for ``model``, if any."""
    return _PLANS.get(model)


def remember_plan(model: torch.nn.Module, plan: FoldPlan) -> None:
    _PLANS[model] = plan


def stream_names(tensors: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """id -> name of a stream's parameters and buffers; a tensor object given under two
    names (one mask passed for two weights) is left out: it names no single layer."""
    names: dict[int, str | None] = {}
    for name, tensor in tensors.items():
        names[id(tensor)] = None if id(tensor) in names else name
    return {key: name for key, name in names.items() if name is not None}


def _folding_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the BatchNorm's pass over the output (read and write) costs more than
    scaling the weight (read and write): not so for the last layers of a VGG, whose
    weights outweigh their few output pixels. The output size is estimated at stride 1."""
    return x.numel() // max(x.shape[1], 1) * weight.shape[0] > weight.numel()


def new_folding(plan: FoldPlan | None, tensors: Mapping[str, torch.Tensor],
                skip: frozenset[int] = frozenset()) -> FoldingRecorder | FoldingRunner:
    """What one stream evaluation does about folding: follow ``plan`` if it folds
    anything, else learn one. ``tensors``: the stream's parameters and buffers by name;
    ``skip``: ids of weights never to fold."""
    names = stream_names(tensors)
    if plan is not None and plan.norms:
        return FoldingRunner(plan, names, tensors, skip)
    return FoldingRecorder(names)


def _bound(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The leading arguments of an op call by name (positional or keyword)."""
    bound = dict(zip(names, args))
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    return bound


def _tensors_in(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors an op call receives, also inside lists (``torch.cat``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


class _Watched:
    """Op outputs followed by identity: ids are reused once a tensor dies, so each entry
    keeps a weak reference to tell its own tensor from a newer one at the same id."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, Any]] = {}

    def add(self, tensor: torch.Tensor, value: Any) -> None:
        self.entries[id(tensor)] = (weakref.ref(tensor), value)

    def remove(self, tensor: torch.Tensor) -> None:
        del self.entries[id(tensor)]

    def find(self, tensor: torch.Tensor) -> Any | None:
        entry = self.entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]


def _norm_of(names: Mapping[int, str], bound: dict[str, Any]) -> FoldedNorm | None:
    """The BatchNorm call ``bound`` as a FoldedNorm, if it uses running statistics of the
    stream's tensors."""
    if bound.get("training", False) or not all(k in bound for k in ("running_mean", "running_var")):
        return None
    mean, var = names.get(id(bound["running_mean"])), names.get(id(bound["running_var"]))
    weight, bias = bound.get("weight"), bound.get("bias")
    weight_name = None if weight is None else names.get(id(weight))
    bias_name = None if bias is None else names.get(id(bias))
    if (mean is None or var is None or (weight is not None and weight_name is None)
            or (bias is not None and bias_name is None)):
        return None
    return FoldedNorm(mean, var, weight_name, bias_name, _eps(bound))


class FoldingRecorder:
    """Watches an unfolded stream and learns which convolutions a plan may fold."""

    def __init__(self, names: Mapping[int, str]) -> None:
        self.names = names  # id of a stream tensor (parameter or buffer) -> its name
        self.outputs = _Watched()  # convolution output -> its weight's name
        self.norms: dict[str, FoldedNorm | None] = {}  # None: disqualified
        self.weight_calls: dict[str, int] = {}

    def op(self, name: str, args: tuple, kwargs: dict) -> None:
        """Before every op: which watched convolution outputs it uses, and how."""
        if name in METADATA_OPS:  # shapes and strides: the same after folding
            return
        for tensor in _tensors_in(args, kwargs):
            weight = self.outputs.find(tensor)
            if weight is None:
                continue
            norm = None
            if name == "batch_norm" and weight not in self.norms:
                bound = _bound(_BATCH_NORM_ARGUMENTS, args, kwargs)
                if bound.get("input") is tensor:
                    norm = _norm_of(self.names, bound)
            # A second use, or any other first use, disqualifies the convolution.
            self.norms[weight] = norm if weight not in self.norms else None

    def convolution(self, evaluate: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
        """Evaluates a convolution and watches its output."""
        result = evaluate(args, kwargs)
        weight = self.names.get(id(_bound(_CONV_ARGUMENTS, args, kwargs).get("weight")))
        if weight is not None and isinstance(result, torch.Tensor):
            self.weight_calls[weight] = self.weight_calls.get(weight, 0) + 1
            self.outputs.add(result, weight)
        return result

    def finish(self) -> None:
        """Nothing to check at the end of an unfolded stream."""

    def result(self) -> FoldPlan:
        """The plan learned from the stream."""
        return FoldPlan({weight: norm for weight, norm in self.norms.items()
                         if norm is not None and self.weight_calls.get(weight) == 1})


class FoldingRunner:
    """Folds the plan's convolutions in one stream evaluation and checks the plan."""

    def __init__(self, plan: FoldPlan, names: Mapping[int, str], tensors: Mapping[str, torch.Tensor],
                 skip: frozenset[int] = frozenset()) -> None:
        self.plan = plan
        self.names = names  # id of a stream tensor -> its name
        self.tensors = tensors  # name -> the stream's tensor
        self.skip = skip  # ids of weights left unfolded (B's all-ones weights: a box filter)
        self.pending = _Watched()  # folded output -> its FoldedNorm, until its BatchNorm
        self.done = _Watched()  # folded outputs whose BatchNorm has run: must not be used
        self.folded: set[str] = set()

    def op(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Before every op. For the BatchNorm of a folded output: that output (the caller
        returns an alias of it). Raises FoldMismatch if the op breaks the plan."""
        if name in METADATA_OPS:
            return None
        for tensor in _tensors_in(args, kwargs):
            if self.done.find(tensor) is not None:
                raise FoldMismatch(f"`{name}` uses a convolution output after its folded BatchNorm")
            norm = self.pending.find(tensor)
            if norm is None:
                continue
            bound = _bound(_BATCH_NORM_ARGUMENTS, args, kwargs) if name == "batch_norm" else {}
            if bound.get("input") is not tensor or not self._same_norm(norm, bound):
                raise FoldMismatch(f"`{name}` uses a convolution output the plan folds into a BatchNorm")
            self.pending.remove(tensor)
            self.done.add(tensor, True)
            return tensor
        return None

    def _same_norm(self, norm: FoldedNorm, bound: dict[str, Any]) -> bool:
        return (not bound.get("training", False) and _eps(bound) == norm.eps
                and all(bound.get(key) is (None if tensor_name is None else self.tensors.get(tensor_name))
                        for key, tensor_name in (("running_mean", norm.running_mean),
                                                 ("running_var", norm.running_var),
                                                 ("weight", norm.weight), ("bias", norm.bias))))

    def convolution(self, evaluate: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
        """Evaluates a convolution, with its BatchNorm folded in if the plan says so; the
        folded output then waits for that BatchNorm."""
        bound = _bound(_CONV_ARGUMENTS, args, kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        weight_name = self.names.get(id(weight))
        norm = self.plan.norms.get(weight_name) if id(weight) not in self.skip else None
        if norm is None or not _folding_pays(bound["input"], weight):
            return evaluate(args, kwargs)
        if weight_name in self.folded:
            raise FoldMismatch(f"the folded convolution weight {weight_name} is used twice")
        self.folded.add(weight_name)
        t = self.tensors
        if any(n is not None and n not in t for n in (norm.running_mean, norm.running_var, norm.weight, norm.bias)):
            raise FoldMismatch(f"the BatchNorm folded into {weight_name} is not among the model's tensors")
        scale, shift = folded_batch_norm(
            t[norm.running_mean], t[norm.running_var],
            None if norm.weight is None else t[norm.weight],
            None if norm.bias is None else t[norm.bias], norm.eps)
        folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        folded_bias = shift if bias is None else torch.addcmul(shift, bias, scale)
        rest = {k: v for k, v in kwargs.items() if k not in _CONV_ARGUMENTS}
        result = evaluate((bound["input"], folded_weight, folded_bias, *args[3:]), rest)
        self.pending.add(result, norm)
        return result

    def result(self) -> FoldPlan:
        """The plan, which the stream followed."""
        return self.plan

    def finish(self) -> None:
        """At the end of the stream: every folded output met its BatchNorm."""
        if any(ref() is not None for ref, _ in self.pending.entries.values()):
            raise FoldMismatch("a folded convolution output never reached its BatchNorm")
