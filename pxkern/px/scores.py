"""``px_scores``: PX scores of every prunable weight of a stock model (px-spec.md).

The data enter the score only through ``v = sum over all samples of z1`` (architecture.md):
1. data pass: for each batch, stream A records the ReLU gates and stream B accumulates
   its output into ``v`` (no autograd, memory of one batch);
2. kernel pass: stream C on one all-ones sample and one vector-Jacobian product with
   cotangent ``v``; its weight gradients ``G_l`` give ``S_l = |G_l| * W_l**2``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.profiler import record_function

from pxkern.backend import BACKENDS, choose_backend
from pxkern.data import iter_batches
from pxkern.evaluation import batchnorm_buffer_copies, check_bn_mode, model_state_restored, unit_prune_masks
from pxkern.memory import reused_cpu_memory
from pxkern.px.scaled import Exponents, ScaledSum, largest_magnitude, largest_nonnegative, stream_layout
from pxkern.pruning.blocks import block_mean_scores, check_block
from pxkern.px.folding import FoldMismatch, FoldPlan, new_folding, plan_for, remember_plan
from pxkern.px.fused import FusedPlan, UnsupportedByPlan, cached_plan, reusing_plans
from pxkern.px.program import plan_raw_scores
from pxkern.px.streams import (
    KERNEL_DTYPE,
    LeftTrueScale,
    Stream,
    StreamState,
    check_true_scale,
    kept_parameter_names,
    run_gates,
    run_stream,
    stream_parameters,
)
from pxkern.weights import is_all_ones, last_linear_name, prunable_weights, resolve_masks


# Profiler ranges of the stream path (``torch.profiler``): where a call's time goes, as
# ``benchmarks/bench_px_scores.py --breakdown`` reports it. A range costs ~1 us when no
# profiler runs.
STAGE_LABELS = {"A": "pxkern::stream_A", "B": "pxkern::stream_B", "C": "pxkern::stream_C"}


def _validate(model: nn.Module, bn: str, dtype: torch.dtype) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_bn_mode(bn)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    # A NaN weight or running statistic would surface as a non-finite stream value deep
    # in the streams; name it instead. One read of the tensors (their extremes, into which
    # NaN and inf propagate): isfinite().all() took three passes and a bool copy, 22 ms of
    # a 300 ms call on ResNet-18. Only if that finds one does a second look name it.
    # The tensors from one walk of the modules; their names only if one is not finite.
    tensors = [t for m in model.modules() for group in (m._parameters, m._buffers) for t in group.values()
               if t is not None and t.is_floating_point()]
    if math.isfinite(largest_magnitude(tensors)):
        return
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor.is_floating_point() and not math.isfinite(largest_magnitude([tensor])):
                raise ValueError(f"model {kind} '{name}' contains NaN or infinite values")


def px_scores(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    bn: str = "eval",
    keep: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] | None = None,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """PX scores of the prunable weights of ``model`` (px-spec.md sections 2-3, 5).

    Args:
        model: any ``nn.Module`` of stock layers; left exactly as it is.
        data: one input batch ``B x ...``, or an iterable of batches or ``(x, y)`` pairs;
            scores accumulate over all of them.
        masks: 0/1 or bool tensors keyed by weight name (``"layer1.0.conv1.weight"``);
            default: the ``torch.nn.utils.prune`` masks the model carries, else all ones.
        bn: ``"eval"`` (default) uses BatchNorm's running statistics in every stream;
            ``"batch"`` reproduces the official code, whose streams B and C run BatchNorm
            in train mode: their exact scores are degenerate (it warns).
        keep: names of modules whose parameters every stream uses unchanged, besides
            normalization layers; default: the last ``nn.Linear`` (the classifier).
        dtype: the precision of streams A and B (float32 or float64); C runs in float64.
        block: ``(bm, bn)`` to score weight blocks of the ``[C_out, C_in*kh*kw]`` matrix
            instead of single weights: every weight gets its block's mean score
            (:mod:`pxkern.pruning.blocks`).
        backend: ``"triton"`` (the default for CUDA models) and ``"cpp"`` (the default
            on the CPU; inside ``pxkern.px.fused.plans_reused``, as in ``prune``) run the
            fused plan of :mod:`pxkern.px.fused` on their kernels, ``"torch"`` and a
            single ``"cpp"`` call the stream path (:mod:`pxkern.px.streams`); also set by
            ``PXKERN_BACKEND`` (:mod:`pxkern.backend`). A model the fused plan does
            not run is scored on the stream path, which runs any model (with a warning
            naming what the model lacks if ``"triton"`` was chosen).

    Returns:
        ``{weight name: float32 tensor shaped like the weight}``: ``>= 0``, zero where
        masked, divided by one positive constant so that the largest score is 1.
    """
    _validate(model, bn, dtype)
    if block is not None:
        check_block(block)
    if bn == "batch":
        warnings.warn(
            "px_scores(bn='batch') reproduces the official PX code: BatchNorm with batch "
            "statistics on stream C's constant input makes the exact scores of networks "
            "ending in global average pooling zero, so the scores are rounding noise "
            "(px-spec.md section 5). Use bn='eval' for meaningful scores.",
            stacklevel=2,
        )
    weights = prunable_weights(model)
    device = weights[0].param.device
    mask_values = resolve_masks(weights, masks)
    if keep is None:
        classifier = last_linear_name(model)
        keep = () if classifier is None else (classifier,)
    kept = kept_parameter_names(model, tuple(keep))

    batches = _CheckedBatches(data, device, dtype)
    with model_state_restored(model), reused_cpu_memory():
        plan = _fused_plan(model, weights, keep, bn, dtype, backend)
        if plan is not None:
            try:
                return _finished(_float32_scores(plan_raw_scores(plan, batches, mask_values, weights)),
                                 block, mask_values)
            except LeftTrueScale:
                pass  # stream A left float32's safe range: the stream path scales it
        parameters = stream_parameters(model, weights, mask_values, kept, dtype)
        buffers = _stream_buffers(model, weights, bn, dtype)
        v = ScaledSum()
        fold_plan = plan_for(model)
        with torch.no_grad():
            for x in batches:
                with record_function(STAGE_LABELS["A"]):
                    gates, fold_plan = run_gates(model, x, parameters.gates, buffers, parameters.block_sparse,
                                                 fold_plan)
                paths = StreamState(Stream.PATHS, Exponents(), gates, parameters.ones_weights,
                                    parameters.block_sparse)
                with record_function(STAGE_LABELS["B"]):
                    z1, exponent = _run_paths(model, paths, x * x, parameters, buffers, bn, fold_plan)
                    v.add(z1.sum(0), exponent)
        remember_plan(model, fold_plan)
        with record_function(STAGE_LABELS["C"]):
            kernel_buffers = _stream_buffers(model, weights, bn, KERNEL_DTYPE)
            try:
                scores = _kernel_scores(model, batches.sample_shape, parameters, kernel_buffers, v, weights,
                                        mask_values, bn, true_scale=True)
            except LeftTrueScale:
                scores = _kernel_scores(model, batches.sample_shape, parameters, kernel_buffers, v, weights,
                                        mask_values, bn, true_scale=False)
    return _finished(scores, block, mask_values)


def _kernel_scores(model: nn.Module, sample_shape: torch.Size, parameters, buffers, v: ScaledSum,
                   weights, masks, bn: str, true_scale: bool) -> dict[str, torch.Tensor]:
    """Stream C on one all-ones sample, then the scores from its vector-Jacobian product
    with ``v``. In true scale (float64, no exponent bookkeeping on every op), a value or a
    gradient outside ``TRUE_SCALE_RANGE`` raises LeftTrueScale: the caller runs C again
    with power-of-two exponents, as for stream A (``run_gates``)."""
    with torch.enable_grad():
        # One sample is exact (every sample of C's input is the same); BatchNorm with
        # batch statistics needs two values per channel, and identical samples give
        # the same statistics.
        copies = 2 if bn == "batch" else 1
        device = weights[0].param.device
        ones = torch.ones((copies, *sample_shape), dtype=KERNEL_DTYPE, device=device)
        # C's input requires grad so that every block-sparse layer's backward runs,
        # also one with no dense leaf before it.
        ones.requires_grad_()
        kernel = StreamState(Stream.KERNEL, Exponents(), kernel_layers=parameters.kernel_layers,
                             true_scale=true_scale)
        z2, _ = run_stream(model, kernel, ones, parameters.kernel, buffers, bn)
    return _scores_from_kernel(z2, ones, v, parameters.kernel_weights, weights, masks, true_scale)


def _run_paths(model: nn.Module, state: StreamState, x: torch.Tensor, parameters, buffers, bn: str,
               fold_plan: FoldPlan) -> tuple[torch.Tensor, int]:
    """Stream B, with the BatchNorms A folded (in eval mode; B's all-ones weights stay
    box filters). A followed the plan on the same forward, so a mismatch here means the
    forward's structure depends on parameter values; B cannot rerun, its gates are spent."""
    tensors = {**parameters.paths, **buffers}
    folding = new_folding(fold_plan, tensors, frozenset(parameters.ones_weights)) if bn == "eval" else None
    try:
        return run_stream(model, state, x, parameters.paths, buffers, bn, folding)
    except FoldMismatch as mismatch:
        raise RuntimeError(
            f"stream B used a convolution output differently from stream A ({mismatch}): PX "
            f"needs a forward whose structure does not depend on parameter values"
        ) from mismatch


class _CheckedBatches:
    """The batches of ``data`` in the streams' dtype and layout; all must share one
    sample shape, which is kept for stream C."""

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.data, self.device, self.dtype = data, device, dtype
        self.sample_shape: torch.Size | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x in iter_batches(self.data, self.device):
            if self.sample_shape is not None and x.shape[1:] != self.sample_shape:
                raise ValueError(
                    f"data batches differ in sample shape: {tuple(self.sample_shape)} and "
                    f"{tuple(x.shape[1:])}"
                )
            self.sample_shape = x.shape[1:]
            yield x.to(self.dtype).contiguous(memory_format=stream_layout(x))


def _fused_plan(model: nn.Module, weights, keep: Iterable[str], bn: str, dtype: torch.dtype,
                backend: str | None) -> FusedPlan | None:
    """The fused plan when the Triton backend, or inside ``plans_reused`` the C++ one, is
    chosen and the plan can run this model (see :mod:`pxkern.px.fused` for why the CPU
    plan waits for reuse); None means the stream path (which runs any model), with a
    warning if Triton was chosen. On the CPU the stream path is the general path and
    needs no warning."""
    device = weights[0].param.device
    chosen = choose_backend("px_scores", device, backend, implemented=BACKENDS)
    if chosen == "torch" or (chosen == "cpp" and not reusing_plans()):
        return None
    try:
        if bn != "eval" or dtype != torch.float32:
            raise UnsupportedByPlan(f"bn={bn!r}, dtype={dtype} (it runs bn='eval' in float32)")
        return cached_plan(model, weights, set(keep), chosen)
    except UnsupportedByPlan as reason:
        if chosen == "triton":
            warnings.warn(
                f"px_scores: the fused Triton path does not run this model ({reason}); scoring "
                f"it on the stream path instead", stacklevel=3,
            )
        return None


def _finished(scores: dict[str, torch.Tensor], block, masks) -> dict[str, torch.Tensor]:
    """Block means if asked for (:mod:`pxkern.pruning.blocks`)."""
    if block is None:
        return scores
    blocked = block_mean_scores(scores, block)
    return _divided_by_largest({name: s * masks[name] for name, s in blocked.items()})


def _divided_by_largest(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide every score (``>= 0``, in place) by the largest one, so that it becomes 1."""
    top = largest_nonnegative(scores.values())
    return {name: s.div_(top) if top > 0 else s for name, s in scores.items()}


def _stream_buffers(model: nn.Module, weights, bn: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's buffers in ``dtype``; copies of BatchNorm's for ``bn="batch"`` (train
    mode updates them); unit prune masks (the substituted weights carry the masks)."""
    buffers = {name: b.to(dtype) if b.is_floating_point() else b for name, b in model.named_buffers()}
    if bn == "batch":
        buffers.update({name: b.to(dtype) for name, b in batchnorm_buffer_copies(model).items()})
    buffers.update(unit_prune_masks(weights, dtype))
    return buffers


def _check_finite(largest: float) -> None:
    if not math.isfinite(largest):
        raise FloatingPointError("PX gradients are not finite; please report this model")


def _exponent(largest: float) -> int:
    """The exponent ``e`` of a largest magnitude (in ``[2**(e-1), 2**e)``): multiplying by
    ``2**-e`` brings it to 1 before a float32 cast."""
    _check_finite(largest)
    return math.frexp(largest)[1] if largest > 0 else 0


def _float32_scores(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float64 scores (``>= 0``) up to a global factor, as float32 with the largest equal
    to 1: divided by the largest in float64 (which makes it exactly 1), rounded once."""
    largest = largest_nonnegative(raw.values())
    _check_finite(largest)
    if largest == 0:
        return {name: s.float() for name, s in raw.items()}
    return {name: torch.div(s, largest, out=torch.empty(s.shape, dtype=torch.float32, device=s.device))
            for name, s in raw.items()}


def _scores_from_kernel(z2, kernel_input, v, kernel_weights, weights, masks,
                        true_scale: bool) -> dict[str, torch.Tensor]:
    """``S_l = |dR/dP_l| * W_l**2`` (masked), normalized so that the largest is 1.

    The float64 gradients are rescaled by one power of two and cast to float32 before the
    weight-sized products: their cancellations are resolved by then, and float64
    temporaries of every weight would cost more than stream C itself on VGGs.
    Block-sparse layers (:class:`~pxkern.px.streams.BlockSparseKernelLayer`) leave their
    float64 scores at the stored blocks instead of a gradient. With ``true_scale`` (C ran
    without exponents), gradients outside ``TRUE_SCALE_RANGE`` raise LeftTrueScale.
    """
    cotangent = v.direction().to(z2.dtype).expand_as(z2) / z2.shape[0]
    dense = [w for w in weights if isinstance(kernel_weights[w.name], torch.Tensor)]
    layers = {w.name: kernel_weights[w.name] for w in weights if w not in dense}
    leaves = [kernel_weights[w.name] for w in dense]
    # The vector-Jacobian product as the gradient of the scalar <z2, cotangent>: the same
    # numbers (its backward multiplies the cotangent by exactly 1), but autograd.grad with
    # grad_outputs imports sympy on its first call in a process (torch.autograd._make_grads),
    # ~0.4 s: more than a whole px_scores call on ResNet-20 at B=128.
    r = torch.sum(z2 * cotangent)
    grads = torch.autograd.grad(r, [*leaves, kernel_input], allow_unused=True)[:-1]
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    block_scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    # The power of two is skipped (a weight-sized pass) when the gradients fit float32
    # comfortably anyway. Block scores (|G| * W**2) bound the same range.
    largest = largest_magnitude([*grads, *block_scores])
    if true_scale:
        check_true_scale(largest, KERNEL_DTYPE)
    exponent = _exponent(largest)
    scale = math.ldexp(1.0, -exponent) if abs(exponent) > 64 else 1.0
    scores = {name: (layer.dense_scores() * scale).float() if layer.scores is not None
              else torch.zeros(layer.weight.shape, device=layer.weight.device)
              for name, layer in layers.items()}
    for w, grad in zip(dense, grads):
        weight = w.param.detach().float()
        score = (grad.mul_(scale) if scale != 1.0 else grad).float().abs_().mul_(weight).mul_(weight)
        if not is_all_ones(masks[w.name]):
            score.mul_(masks[w.name].float())
        scores[w.name] = score
    return _divided_by_largest({w.name: scores[w.name] for w in weights})
