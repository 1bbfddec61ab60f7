"""The fused plan of PX scoring (pxkern.px.fused) against the float64 reference.

The plan runs each layer group through the fused ops. With the ops' "torch" and "cpp"
(the CPU default: oneDNN, sparse_conv2d and gate_streams) backends it is checked over the
zoo quickly; with the "triton" backend (Triton's interpreter on CPU tensors) whole
``px_scores(..., backend="triton")`` calls on a small CNN and MLP must give the stream
path's scores. Tolerances as in test_px_scores (px-spec.md section 5): per layer 1e-4 of
the layer's maximum, and the same global top-k masks; the two float32 paths against each
other: 1e-5.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import pxkern.px.fused
import zoo
from pxkern import px_scores
from pxkern.px.fused import UnsupportedByPlan, build_plan
from pxkern.px.streams import LeftTrueScale
from pxkern.testing import assert_same_topk_masks, assert_scores_close, reference_px_scores
from pxkern.weights import last_linear_name, prunable_weights, resolve_masks

FUSIBLE = ["mlp", "resnet20", "resnet20_nobn", "vgg16_bn", "vgg16", "resnet18_tv", "functional_relu_cnn"]
# The CPU plan leaves hidden Linear layers to the stream path's block-sparse kernels.
FUSIBLE_ON_CPU = [name for name in FUSIBLE if name != "mlp"]


def _plan_scores(model: nn.Module, x: torch.Tensor, masks=None, backend="torch") -> dict[str, torch.Tensor]:
    """Raw scores of the plan with the fused ops' ``backend``."""
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, backend)
    return plan.raw_scores([x], resolve_masks(weights, masks), weights)


@pytest.mark.parametrize("density", [None, 0.3])
@pytest.mark.parametrize("name,backend", [(n, "torch") for n in FUSIBLE] + [(n, "cpp") for n in FUSIBLE_ON_CPU])
def test_plan_matches_float64_reference(name, backend, density):
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, density) if density else None
    expected = reference_px_scores(model, x, masks=masks)
    actual = _plan_scores(model, x, masks, backend)
    assert_scores_close(actual, expected, rel=1e-4)
    assert_same_topk_masks(actual, expected)


@pytest.mark.parametrize("density", [None, 0.8, 0.3])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-kernels", "aten"])
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "resnet18_tv"])
def test_cpu_plan_on_each_kernel_matches_float64_reference(monkeypatch, name, sparse, density):
    """The CPU plan's kernel choices, each forced for every layer: all convolutions (A, B
    and C, forward and backward) on ``sparse_conv2d`` (B's masks denser than one half as
    their complement with ``ones_scale``), or all on ATen."""
    import pxkern.ops.px_conv2d as conv_op
    import pxkern.ops.sparse_conv2d as sparse_op

    monkeypatch.setattr(sparse_op, "MAX_SPARSE_DENSITY", 1.0)  # measure even dense weights
    monkeypatch.setattr(sparse_op, "second_is_faster", lambda key, first, second, level: sparse)
    monkeypatch.setattr(conv_op, "second_is_faster", lambda key, first, second, level: sparse)
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, density) if density else None
    expected = reference_px_scores(model, x, masks=masks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        actual = _plan_scores(model, x, masks, "cpp")
    assert_scores_close(actual, expected, rel=1e-4)
    assert_same_topk_masks(actual, expected)
    # Both kernels pass the comparison: check that the forced one ran.
    sparse_calls = sum(event.name == "pxkern::sparse_conv2d" for event in profile.events())
    assert (sparse_calls > 0) == sparse, sparse_calls


@pytest.mark.parametrize("density", [None, 0.3, 0.02])
@pytest.mark.parametrize("name", FUSIBLE_ON_CPU)
def test_cpu_default_is_the_plan_and_equals_the_stream_path(name, density):
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, density) if density else None
    weights = prunable_weights(model)
    build_plan(model, weights, {last_linear_name(model)}, "cpp")  # the plan runs it: no fallback
    before = zoo.snapshot(model)
    with pxkern.px.fused.plans_reused():
        fused = px_scores(model, [x[:2], x[2:]], masks=masks)
        again = px_scores(model, [x[:2], x[2:]], masks=masks)  # with the plan of the first call
    zoo.assert_untouched(model, before)
    # Both float32 paths against the float64 reference: at low densities early layers'
    # gradients cancel to 1e-3 of their terms, so float32 rounding of B differs by up to
    # ~6e-5 between them (VGG-16-bn at 0.02), inside the spec's 1e-4 but not 1e-5.
    expected = reference_px_scores(model, x, masks=masks)
    for scores in (fused, px_scores(model, x, masks=masks, backend="torch")):
        assert_scores_close(scores, expected, rel=1e-4)
        assert_same_topk_masks(scores, expected)
    assert all(torch.equal(fused[k], again[k]) for k in fused)


class _Scaled(nn.Module):
    """Plain conv + ReLU layers whose weights multiply magnitudes by ``gain`` each: stream
    A leaves float32's safe range inside the layer groups, where the CPU plan does not
    look, and is caught at the classifier's input."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(4)
        layers = [m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU())]
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            for conv in self.convs[::2]:
                conv.weight.mul_(gain)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

    def forward(self, x):
        return self.head(self.convs(x))


@pytest.mark.parametrize("gain", [1e4, 1e-4])
def test_stream_a_out_of_range_falls_back_to_the_scaled_stream_path(gain):
    model, x = _Scaled(gain), torch.randn(3, 4, 5, 5)
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, "cpp")
    with pytest.raises(LeftTrueScale):
        plan.raw_scores([x], resolve_masks(weights, None), weights)
    with pxkern.px.fused.plans_reused():
        actual = px_scores(model, x)
    assert_scores_close(actual, reference_px_scores(model, x), rel=1e-4)


def test_models_with_forward_hooks_run_on_the_stream_path():
    # Tracing skips hooks; the stream path runs the forward with them.
    model, x = small_cnn()
    model.branch.register_forward_hook(lambda module, inputs, output: output * 3.0)
    with pytest.raises(UnsupportedByPlan, match="forward hooks on module 'branch'"):
        build_plan(model, prunable_weights(model), {"head.2"}, "cpp")
    assert_scores_close(px_scores(model, x), px_scores(model, x, backend="torch"), rel=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_only_layers_feeding_a_gated_residual_add_skip_b_peak(backend):
    """On the CPU the residual add + ReLU measures B's peak (gate_streams), so the layers
    that end a residual branch or shortcut do not; every other layer's peak is needed."""
    model, _ = zoo.ZOO["resnet20"]()
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, backend)
    skipped = {g.weight.name for g in plan.groups.values() if not g.b_peak_needed}
    branch_ends = {w.name for w in weights if w.name.endswith(("conv2.weight", "shortcut.0.weight"))}
    assert len(branch_ends) == 11
    assert skipped == (branch_ends if backend == "cpp" else set())


def test_cpu_plans_run_and_are_reused_inside_plans_reused_while_the_model_is_unchanged(monkeypatch):
    model, x = small_cnn()
    traced = []
    original = pxkern.px.fused.build_plan
    monkeypatch.setattr(pxkern.px.fused, "build_plan", lambda *a: traced.append(1) or original(*a))
    px_scores(model, x)
    px_scores(model, x)
    assert not traced, "outside plans_reused a CPU call takes the stream path"
    with pxkern.px.fused.plans_reused():
        px_scores(model, x)
        px_scores(model, x)
        assert len(traced) == 1
        model.branch = nn.Conv2d(6, 6, 3, padding=1, bias=False)  # a new module: traced anew
        actual = px_scores(model, x)
        assert len(traced) == 2
    assert_scores_close(actual, reference_px_scores(model, x))


def test_reused_plans_see_batch_norms_changed_in_place_or_replaced():
    """The plan keeps each group's folded BatchNorm between calls; an in-place change of a
    running statistic or a replaced parameter must reach the scores."""
    model, x = small_cnn()
    zoo.randomize_norms(model)
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pxkern.px.fused.plans_reused():
        px_scores(model, x)
        with torch.no_grad():
            norm.running_var.mul_(4.0)
        assert_scores_close(px_scores(model, x), reference_px_scores(model, x))
        norm.weight = nn.Parameter(norm.weight.detach() * -0.5)
        assert_scores_close(px_scores(model, x), reference_px_scores(model, x))


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    """Every kind of node the plan runs: conv+BN+ReLU groups, a bias-free strided conv,
    pooling, a residual add, a standalone ReLU, flatten and the kept classifier."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.branch = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.down = nn.Conv2d(6, 8, 1, stride=2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            y = self.pool(self.stem(x))
            y = torch.relu(self.branch(y) + y)
            return self.head(self.down(y))

    torch.manual_seed(0)
    model = zoo.randomize_norms(Net().eval())
    return model, torch.randn(3, 3, 9, 9)


def small_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 3))
    return zoo.randomize_norms(model.eval()), torch.randn(5, 7)


def token_mlp() -> tuple[nn.Module, torch.Tensor]:
    """Linear layers on ``[batch, tokens, features]``: C's one sample gives 3 rows, and a
    BatchNorm1d after a Linear normalizes the token axis (dimension 1), not the features."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
                          nn.Flatten(), nn.Linear(15, 3))
    return zoo.randomize_norms(model.eval()), torch.randn(4, 3, 6)


@pytest.mark.parametrize("density", [None, 0.5])
@pytest.mark.parametrize("factory", [small_cnn, small_mlp, token_mlp])
def test_triton_px_scores_equal_the_stream_path(factory, density):
    model, x = factory()
    masks = zoo.random_masks(model, density) if density else None
    before = zoo.snapshot(model)
    fused = px_scores(model, [x[:2], x[2:]], masks=masks, backend="triton")
    zoo.assert_untouched(model, before)
    streams = px_scores(model, x, masks=masks)
    assert_scores_close(fused, streams, rel=1e-5)
    assert_scores_close(fused, reference_px_scores(model, x, masks=masks))
    assert max(float(s.max()) for s in fused.values()) == 1.0


def test_triton_px_scores_use_carried_prune_masks():
    model, x = small_cnn()
    masks = zoo.random_masks(model, 0.5)
    torch_prune.custom_from_mask(model.branch, "weight", masks["branch.weight"])
    expected = px_scores(model, x)
    assert_scores_close(px_scores(model, x, backend="triton"), expected, rel=1e-5)


def _leaky_mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(), nn.Linear(5, 2)), torch.randn(3, 4)


@pytest.mark.parametrize(
    "factory, fragment",
    [
        (_leaky_mlp, "LeakyReLU"),
        (zoo.conv1d_net, "Conv1d"),
        (zoo.custom_modules_cnn, "function"),
    ],
)
def test_models_the_plan_does_not_run_fall_back_with_the_reason(factory, fragment):
    model, x = factory()
    with pytest.raises(UnsupportedByPlan, match=fragment):
        build_plan(model, prunable_weights(model), set(), "torch")
    with pytest.warns(UserWarning, match=f"fused Triton path does not run this model.*{fragment}"):
        fused = px_scores(model, x, backend="triton")
    assert_scores_close(fused, px_scores(model, x), rel=1e-6)


def test_batch_statistics_use_the_stream_path():
    model, x = small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = px_scores(model, x, bn="batch")
    with pytest.warns(UserWarning, match="bn='batch'"):
        actual = px_scores(model, x, bn="batch", backend="triton")
    assert_scores_close(actual, expected, rel=1e-6)


class _ShiftedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x + 1.0)


def test_constants_added_to_stream_values_are_refused():
    model = _ShiftedInput()
    with pytest.raises(UnsupportedByPlan, match="addition of a constant"):
        build_plan(model, prunable_weights(model), set(), "torch")


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        y = self.layer(x)
        return y, y


def test_models_returning_several_tensors_are_an_error_as_on_the_stream_path():
    model = _TwoOutputs()
    for backend in ("triton", "torch"):
        with pytest.raises(TypeError, match="returned a tuple"):
            px_scores(model, torch.randn(2, 4), backend=backend)


def test_shared_layers_are_refused():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    with pytest.raises(UnsupportedByPlan, match="called more than once"):
        build_plan(model, prunable_weights(model), set(), "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [small_cnn, small_mlp])
def test_cuda_models_score_through_the_fused_kernels_like_the_cpu(factory):
    model, x = factory()
    expected = px_scores(model, x)
    actual = px_scores(model.cuda(), x.cuda())
    assert_scores_close({name: s.cpu() for name, s in actual.items()}, expected, rel=1e-5)
