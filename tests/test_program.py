"""The fused plan's program (pxkern.px.program: one C++ call, pxkern::plan_scores, per
scoring) against the Python plan it is lowered from and against the float64 reference.

The program runs the Python plan's kernels in the same order and precision, so with the
kernel choices the plan made it must give the plan's raw scores: held to 1e-12 of each
layer's largest (they came out bitwise equal). With each kernel choice forced for every
layer, it must meet the spec's tolerance against the float64 reference (1e-4 of each
layer's largest, the same global top-k masks), as the plan's own tests do.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pxkern.ops.measured_choice
import pxkern.px.program
import zoo
from pxkern import px_scores
from pxkern.px.fused import UnsupportedByPlan, build_plan, plans_reused
from pxkern.px.program import lower, plan_raw_scores
from pxkern.px.scaled import stream_layout
from pxkern.px.streams import LeftTrueScale
from pxkern.testing import assert_same_topk_masks, assert_scores_close, reference_px_scores
from pxkern.weights import last_linear_name, prunable_weights, resolve_masks
from test_px_fused import _Scaled

pytestmark = pytest.mark.skipif(not pxkern.px.program.EXTENSION_AVAILABLE, reason="needs the C++ extension")

LOWERED = ["resnet20", "resnet20_nobn", "vgg16_bn", "vgg16", "resnet18_tv"]


def _setup(name: str, density: float | str | None):
    """A zoo model with random BatchNorms, its masks ("dead": density 0.3 with one conv
    layer pruned away), plan, program and batch."""
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    masks = None
    if density is not None:
        masks = zoo.random_masks(model, 0.3 if density == "dead" else density)
        if density == "dead":
            conv = [name for name, m in masks.items() if m.dim() == 4][1]
            masks[conv] = torch.zeros_like(masks[conv])
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, "cpp")
    batch = x.contiguous(memory_format=stream_layout(x))
    return model, x, masks, weights, plan, lower(plan, batch), batch


def _assert_equal_scores(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, e in expected.items():
        torch.testing.assert_close(actual[key], e, rtol=0, atol=1e-12 * float(e.abs().max()), msg=key)


@pytest.mark.parametrize("density", [None, 0.8, 0.3, "dead"])
@pytest.mark.parametrize("name", LOWERED)
def test_program_equals_the_python_plan(name, density):
    _, _, masks, weights, plan, program, batch = _setup(name, density)
    masks = resolve_masks(weights, masks)
    expected = plan.raw_scores([batch], masks, weights)
    # The plan's ops measured their kernels; the program finds each choice under the same
    # keys, without measuring again.
    counts = [int(masks[layer.group.weight.name].count_nonzero()) for layer in program.layers]
    assert all(layer.choices(count) is not None for layer, count in zip(program.layers, counts) if count)
    _assert_equal_scores(program.raw_scores([batch], masks, weights), expected)


@pytest.mark.parametrize("density", [None, 0.3, 0.05])
def test_program_measures_the_choices_it_has_not_seen_as_the_plan_would(monkeypatch, density):
    # With no kernel measured yet the program measures its layers' choices itself; the
    # Python plan then finds them all under its own keys, so both run the same kernels.
    monkeypatch.setattr(pxkern.ops.measured_choice, "_CHOICES", {})
    _, _, masks, weights, plan, program, batch = _setup("resnet20", density)
    masks = resolve_masks(weights, masks)
    actual = program.raw_scores([batch], masks, weights)
    assert actual is not None
    measured = {key: dict(levels) for key, levels in pxkern.ops.measured_choice._CHOICES.items()}
    expected = plan.raw_scores([batch], masks, weights)
    assert pxkern.ops.measured_choice._CHOICES == measured
    _assert_equal_scores(actual, expected)


def test_program_of_several_batches_equals_the_python_plan():
    _, x, masks, weights, plan, program, batch = _setup("resnet20", 0.3)
    masks = resolve_masks(weights, masks)
    batches = [batch, (batch * 0.5 + 0.25).contiguous(memory_format=stream_layout(batch))]
    expected = plan.raw_scores(batches, masks, weights)
    _assert_equal_scores(program.raw_scores(batches, masks, weights), expected)


def _forced_choices(program, counts: list[int], kind: str) -> list[int]:
    """Every layer's kernels forced: all sparse_conv2d, all ATen, or mixed by layer; B as
    the mask's complement or not, alternating by layer; C's backward split wherever its
    geometry allows."""
    choices = []
    for index, (layer, count) in enumerate(zip(program.layers, counts)):
        if count == 0:
            choices += [1, 0, 0, 0, 0, 0, 0]
            continue
        sparse = {"sparse": 1, "aten": 0, "mixed": index % 2}[kind]
        kernel = layer.group.weight.shape[2:]
        splits = layer.stride == [1, 1] and all(k - 1 - p >= 0 for k, p in zip(kernel, layer.padding))
        complement = 1 if count == layer.group.weight.shape.numel() else index % 2
        choices += [0, sparse, complement, sparse, sparse, int(splits and index % 3 != 0), sparse]
    return choices


@pytest.mark.parametrize("density", [None, 0.3, "dead"])
@pytest.mark.parametrize("kind", ["sparse", "aten", "mixed"])
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "resnet18_tv"])
def test_program_on_each_kernel_matches_float64_reference(name, kind, density):
    model, x, masks, weights, plan, program, batch = _setup(name, density)
    expected = reference_px_scores(model, x, masks=masks)
    resolved = resolve_masks(weights, masks)
    counts = [int(resolved[layer.group.weight.name].count_nonzero()) for layer in program.layers]
    actual = program.run([batch], resolved, weights, counts, _forced_choices(program, counts, kind))
    assert_scores_close(actual, expected, rel=1e-4)
    assert_same_topk_masks(actual, expected)


def test_px_scores_reusing_plans_runs_the_program(monkeypatch):
    model, x = zoo.resnet20()
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, 0.3)
    runs = []
    run = pxkern.px.program.Program.run
    monkeypatch.setattr(pxkern.px.program.Program, "run", lambda self, *a: runs.append(1) or run(self, *a))
    with plans_reused():
        actual = px_scores(model, x, masks=masks)
    assert runs == [1]
    assert_scores_close(actual, reference_px_scores(model, x, masks=masks), rel=1e-4)


def test_a_choice_left_unknown_scores_on_the_python_plan(monkeypatch):
    _, _, masks, weights, plan, program, batch = _setup("resnet20", 0.3)
    masks = resolve_masks(weights, masks)
    expected = plan.raw_scores([batch], masks, weights)
    monkeypatch.setattr(pxkern.px.program._ConvLayer, "choices", lambda self, count: None)
    assert program.raw_scores([batch], masks, weights) is None
    _assert_equal_scores(plan_raw_scores(plan, [batch], masks, weights), expected)


class _Branchy(nn.Module):
    """Every other instruction of a program: a conv group with BatchNorm and no ReLU,
    max pooling, a ReLU of its own, a sum without a ReLU after it, biased convolutions,
    functional adaptive pooling, Dropout and nn.Flatten."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.drop, self.flat, self.fc = nn.Dropout(0.5), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        y = torch.relu(self.pool(self.bn1(self.conv1(x))))
        z = torch.nn.functional.adaptive_avg_pool2d(self.conv2(y) + self.conv3(y), 2)
        return self.fc(self.flat(self.drop(z)))


@pytest.mark.parametrize("density", [None, 0.5])
def test_program_of_every_instruction_equals_the_python_plan_and_the_reference(density):
    model, x = _Branchy().eval(), torch.randn(4, 3, 8, 8)
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, density) if density else None
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, "cpp")
    batch = x.contiguous(memory_format=stream_layout(x))
    program = lower(plan, batch)
    opcodes = set(program.instructions[::pxkern.px.program.WIDTH])
    assert opcodes == {pxkern.px.program.CONV, pxkern.px.program.GATE, pxkern.px.program.ADD,
                       pxkern.px.program.ADAPTIVE_AVG_POOL, pxkern.px.program.FLATTEN,
                       pxkern.px.program.KEPT_LINEAR, pxkern.px.program.MAX_POOL}
    resolved = resolve_masks(weights, masks)
    expected = plan.raw_scores([batch], resolved, weights)
    actual = program.raw_scores([batch], resolved, weights)
    _assert_equal_scores(actual, expected)
    assert_scores_close(actual, reference_px_scores(model, x, masks=masks), rel=1e-4)


class _AveragePooled(nn.Module):
    """Conv-BN-ReLU, nn.AvgPool2d, flatten, Linear: the plan runs it, no program does."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.pool, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2), \
            nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def test_a_plan_that_does_not_lower_scores_on_the_python_plan():
    model, x = _AveragePooled().eval(), torch.randn(4, 3, 8, 8)
    zoo.randomize_norms(model)
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, "cpp")
    with pytest.raises(UnsupportedByPlan, match="pool"):
        lower(plan, x.contiguous(memory_format=stream_layout(x)))
    with plans_reused():
        actual = px_scores(model, x)
        assert plan_programs(model) == [None]
    assert_scores_close(actual, reference_px_scores(model, x), rel=1e-4)


def plan_programs(model: nn.Module) -> list:
    """The programs of the plan ``px_scores`` cached for ``model`` (inside plans_reused)."""
    cached = pxkern.px.fused._PLANS.get(model) if pxkern.px.fused._PLANS is not None else None
    return [] if cached is None else list(cached[1].programs.values())


@pytest.mark.parametrize("gain", [1e4, 1e-4])
def test_stream_a_out_of_range_leaves_the_program_for_the_scaled_stream_path(gain):
    model, x = _Scaled(gain), torch.randn(3, 4, 5, 5)
    weights = prunable_weights(model)
    plan = build_plan(model, weights, {last_linear_name(model)}, "cpp")
    batch = x.contiguous(memory_format=stream_layout(x))
    program = lower(plan, batch)
    masks = resolve_masks(weights, None)
    with pytest.raises(LeftTrueScale):
        program.raw_scores([batch], masks, weights)
    with plans_reused():
        actual = px_scores(model, x)
    assert_scores_close(actual, reference_px_scores(model, x), rel=1e-4)


def test_plan_scores_passes_opcheck():
    _, _, masks, weights, plan, program, batch = _setup("resnet20", 0.3)
    masks = resolve_masks(weights, masks)
    counts = [int(masks[layer.group.weight.name].count_nonzero()) for layer in program.layers]
    arguments = program.arguments([batch], masks, counts, _forced_choices(program, counts, "mixed"))
    torch.library.opcheck(torch.ops.pxkern.plan_scores.default, arguments)
