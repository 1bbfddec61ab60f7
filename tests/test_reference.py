"""Tests of the float64 PX reference (pxkern.testing) and of the top-k thresholding rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import zoo
from pxkern.pruning.threshold import global_keep_masks, global_threshold, layer_keep_masks
from pxkern.testing import (
    assert_same_topk_masks,
    assert_scores_close,
    global_topk_masks,
    reference_px_scores,
)


def assert_rel_equal(actual: dict, expected: dict, rel: float) -> None:
    """Raw (unnormalized) per-layer agreement: max |a - e| <= rel * max |e|."""
    assert list(actual) == list(expected)
    for name, e in expected.items():
        err = (actual[name] - e).abs().max().item()
        peak = e.abs().max().item()
        assert err <= rel * peak, f"{name}: max abs error {err:.3g}, layer max {peak:.3g}, rel {rel:g}"


def random_masks(model: nn.Module, density: float = 0.6, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": (torch.rand(m.weight.shape, generator=generator) < density).float()
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }


# --- (a) closed form for a two-layer MLP ---------------------------------------------------------


def two_layer_closed_form(w1, b1, w2, b2, m1, m2, x, keep_last: bool):
    """PX scores of y = W2 act(W1 x + b1) + b2, written out from spec sections 2-3.

    A: gates G_b = 1[(W1 M1) x_b + b1 > 0].
    B: W1 -> M1, b1 -> 1; h_b = G_b * (M1 x_b^2 + 1); z1_b = W2' h_b + b2'  with
       (W2', b2') = (W2 M2, b2) if the classifier is kept, (M2, 1) if it is transformed.
    C: P1 = (W1 M1)^2, a = P1 1 + b1^2 (ReLU is the identity); z2 = P2 a + b2'' with
       (P2, b2'') = (W2 M2, b2) if kept, ((W2 M2)^2, b2^2) if transformed.
    R = sum_b <z1_b, z2> = <u, z2> with u = sum_b z1_b, hence (b2'' drops out)
       dR/dP1 = (P2^T u) 1^T,   dR/dP2 = u a^T,   S_l = |dR/dP_l| * W_l^2 * M_l.
    """
    zero1 = torch.zeros(w1.shape[0], dtype=w1.dtype) if b1 is None else b1
    zero2 = torch.zeros(w2.shape[0], dtype=w2.dtype) if b2 is None else b2
    one1 = torch.zeros_like(zero1) if b1 is None else torch.ones_like(b1)
    gates = (x @ (w1 * m1).T + zero1 > 0).to(x.dtype)
    h = gates * (x**2 @ m1.T + one1)
    if keep_last:
        w2_b, b2_b, p2 = w2 * m2, zero2, w2 * m2
    else:
        w2_b, b2_b, p2 = m2, torch.zeros_like(zero2) if b2 is None else torch.ones_like(b2), (w2 * m2) ** 2
    u = (h @ w2_b.T + b2_b).sum(0)
    a = (w1 * m1) ** 2 @ torch.ones(w1.shape[1], dtype=w1.dtype) + zero1**2
    g1 = torch.outer(p2.T @ u, torch.ones(w1.shape[1], dtype=w1.dtype))
    g2 = torch.outer(u, a)
    return g1.abs() * w1**2 * m1, g2.abs() * w2**2 * m2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.1), lambda: nn.ReLU(inplace=True)])
@pytest.mark.parametrize("masked", [False, True])
def test_two_layer_mlp_closed_form(bias, keep_last, activation, masked):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5, bias=bias), activation(), nn.Linear(5, 3, bias=bias))
    x = torch.randn(6, 7)
    masks = random_masks(model) if masked else None
    scores = reference_px_scores(model, x, masks=masks, keep=None if keep_last else ())

    d = torch.float64
    w1, w2 = model[0].weight.to(d), model[2].weight.to(d)
    b1 = model[0].bias.to(d) if bias else None
    b2 = model[2].bias.to(d) if bias else None
    m1 = masks["0.weight"].to(d) if masked else torch.ones_like(w1)
    m2 = masks["2.weight"].to(d) if masked else torch.ones_like(w2)
    s1, s2 = two_layer_closed_form(w1, b1, w2, b2, m1, m2, x.to(d), keep_last)
    assert all(s.dtype == torch.float64 for s in scores.values())
    assert_rel_equal(scores, {"0.weight": s1, "2.weight": s2}, rel=1e-12)


def test_functional_relus_match_relu_modules():
    """F.relu / torch.relu / Tensor.relu / Tensor.relu_ are gated exactly like nn.ReLU."""
    functional, x = zoo.functional_relu_cnn()
    f = functional
    modular = nn.Sequential(
        f.conv1, nn.ReLU(), f.conv2, nn.ReLU(), nn.MaxPool2d(2),
        f.conv3, nn.ReLU(), f.conv4, nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(), f.fc,
    )  # fmt: skip
    expected = reference_px_scores(modular, x)
    actual = reference_px_scores(functional, x)
    assert len(actual) == len(expected)
    renamed = dict(zip(expected, actual.values()))  # the same weights, in the same order
    assert_rel_equal(renamed, expected, rel=1e-14)


# --- (b) invariances -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "leaky_cnn"])
def test_split_batch_gives_same_scores(name):
    model, x = zoo.ZOO[name]()
    whole = reference_px_scores(model, x)
    split = reference_px_scores(model, [(x[:1], None), (x[1:], None)])
    assert_rel_equal(split, whole, rel=1e-12)


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_model_and_torch_left_untouched(bn):
    model, x = zoo.resnet18_tv()
    zoo.randomize_norms(model)
    prune.random_unstructured(model.fc, "weight", amount=0.3)
    model.layer1[0].bn1.eval()  # a mixed train/eval state must survive too
    model.layer2.register_forward_hook(lambda *args: None)
    before = zoo.snapshot(model)
    relus = (F.relu, F.relu_, F.leaky_relu, F.leaky_relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    scores = reference_px_scores(model, x, bn=bn)

    zoo.assert_untouched(model, before)
    assert relus == (F.relu, F.relu_, F.leaky_relu, F.leaky_relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
    assert "relu" not in vars(torch.Tensor) and "relu_" not in vars(torch.Tensor)
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(scores) == [f"{name}.weight" for name in layers]
    for name in layers:
        assert scores[f"{name}.weight"].shape == model.get_submodule(name).weight.shape


def test_explicit_masks_zero_and_equal_carried_prune_masks():
    model, x = zoo.resnet20()
    model = zoo.randomize_norms(model)
    masks = random_masks(model)
    explicit = reference_px_scores(model, x, masks=masks)
    for name, score in explicit.items():
        assert bool((score[masks[name] == 0] == 0).all()), f"{name}: masked entries score nonzero"
        assert bool((score[masks[name] == 1] > 0).any()), f"{name}: no kept entry scores"

    pruned = copy.deepcopy(model)
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.custom_from_mask(module, "weight", masks[f"{name}.weight"])
    carried = reference_px_scores(pruned, x)
    assert_rel_equal(carried, explicit, rel=1e-14)

    ones = {name: torch.ones_like(m) for name, m in masks.items()}
    assert_rel_equal(reference_px_scores(pruned, x, masks=ones), reference_px_scores(model, x), rel=1e-14)


def test_custom_modules_mask_buffer_gives_zero_scores():
    model, x = zoo.custom_modules_cnn()
    scores = reference_px_scores(model, x)
    masked_conv = model[3]
    assert bool((scores["3.weight"][masked_conv.mask_buf == 0] == 0).all())
    assert bool((scores["3.weight"][masked_conv.mask_buf == 1] > 0).all())


def test_float32_reference_matches_float64_on_small_model():
    model, x = zoo.mlp()
    scores32 = reference_px_scores(model, x, dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in scores32.values())
    assert_scores_close(scores32, reference_px_scores(model, x), rel=1e-4)


def test_invalid_arguments():
    model, x = zoo.mlp()
    with pytest.raises(ValueError, match="bn"):
        reference_px_scores(model, x, bn="train")
    with pytest.raises(ValueError, match="not a module"):
        reference_px_scores(model, x, keep=["head"])
    with pytest.raises(TypeError, match="keep"):
        reference_px_scores(model, x, keep="4")
    with pytest.raises(TypeError, match="dtype"):
        reference_px_scores(model, x, dtype=torch.int64)
    with pytest.raises(KeyError):
        reference_px_scores(model, x, masks={"nope.weight": torch.ones(1)})


# --- (c) BatchNorm in train mode: the degeneracy of spec section 5 ----------------------------------


def test_batch_statistics_make_scores_vanish_on_resnet20():
    model, x = zoo.resnet20(batch=8)
    evaluated = reference_px_scores(model, x, bn="eval")
    batch = reference_px_scores(model, x, bn="batch")
    eval_max = max(s.max().item() for s in evaluated.values())
    for name, score in batch.items():
        assert score.max().item() < 1e-8 * eval_max, f"{name}: {score.max().item():.3g} vs eval max {eval_max:.3g}"
    # Relative to the layer itself, too: no conv layer keeps a signal above rounding noise.
    for name, score in batch.items():
        assert score.max().item() < 1e-8 * evaluated[name].max().item(), name


# --- (d) thresholds against a brute-force sort ------------------------------------------------------


def brute_force_keep(flat_scores: torch.Tensor, density: float) -> torch.Tensor:
    values = sorted(flat_scores.tolist())
    k = int((1 - density) * len(values))
    threshold = values[k - 1] if k > 0 else -math.inf
    return flat_scores > threshold


def sample_scores(ties: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (13, 7), "b.weight": (4, 3, 3, 3), "c.weight": (97,), "d.weight": (5, 1)}
    if ties:
        return {n: torch.randint(0, 6, s, generator=generator).double() for n, s in shapes.items()}
    return {n: torch.rand(s, generator=generator, dtype=torch.float64) ** 3 for n, s in shapes.items()}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.013, 1e-3])
def test_global_keep_masks_match_sort(ties, density):
    scores = sample_scores(ties)
    masks = global_keep_masks(scores, density)
    expected = brute_force_keep(torch.cat([s.reshape(-1) for s in scores.values()]), density)
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks.values()]), expected)
    assert all(masks[n].shape == scores[n].shape and masks[n].dtype == torch.bool for n in scores)
    assert global_topk_masks(scores, density).keys() == masks.keys()
    if not ties:
        total = sum(s.numel() for s in scores.values())
        assert sum(int(m.sum()) for m in masks.values()) == total - int((1 - density) * total)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.013])
def test_layer_keep_masks_match_sort(ties, density):
    scores = sample_scores(ties, seed=1)
    masks = layer_keep_masks(scores, density)
    for name, s in scores.items():
        assert torch.equal(masks[name].reshape(-1), brute_force_keep(s.reshape(-1), density)), name


def test_threshold_input_validation():
    scores = sample_scores(False)
    for density in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="density"):
            global_keep_masks(scores, density)
        with pytest.raises(ValueError, match="density"):
            layer_keep_masks(scores, density)
    with pytest.raises(TypeError, match="density"):
        global_threshold(scores, True)
    with pytest.raises(ValueError, match="non-empty"):
        global_keep_masks({}, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        global_keep_masks({"a": torch.tensor([1.0, math.nan])}, 0.5)
    with pytest.raises(TypeError, match="floating"):
        layer_keep_masks({"a": torch.tensor([1, 2])}, 0.5)


# --- comparison helpers -------------------------------------------------------------------------------


def test_comparison_helpers_accept_global_rescaling_and_reject_perturbations():
    expected = sample_scores(False)
    scaled = {n: (s * 3.5e-20).float() for n, s in expected.items()}
    assert_scores_close(scaled, expected)
    assert_same_topk_masks(scaled, expected)

    perturbed = {n: s.clone() for n, s in expected.items()}
    perturbed["b.weight"][1, 2, 0, 1] = 0.0
    perturbed["c.weight"] = perturbed["c.weight"].flip(0)
    with pytest.raises(AssertionError, match=r"b\.weight: first mismatch at \(1, 2, 0, 1\)"):
        assert_scores_close(perturbed, expected)
    with pytest.raises(AssertionError, match="differ in"):
        assert_same_topk_masks(perturbed, expected, densities=(0.5,))
    with pytest.raises(AssertionError, match="keys differ"):
        assert_scores_close({"a.weight": expected["a.weight"]}, expected)


def test_topk_comparison_ignores_ties_at_the_threshold():
    expected = {"w": torch.tensor([0.0, 1.0, 2.0, 2.0, 2.0, 3.0], dtype=torch.float64)}
    # The threshold at density 0.5 is 2.0: the three tied entries may go either way.
    actual = {"w": torch.tensor([0.0, 1.0, 2.0, 2.1, 1.9, 3.0])}
    assert_same_topk_masks(actual, expected, densities=(0.5,))
