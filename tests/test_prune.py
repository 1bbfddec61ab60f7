"""The pruning loop: schedule, thresholding, masks on the model, input validation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pxkern.pruning import prune, prune_rounds, score
from pxkern.pruning.masks import apply_masks, density_report
from pxkern.pruning.schedule import exponential_densities
from pxkern.weights import prunable_weights


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    data = [(torch.randn(10, 2, 6, 6), torch.randint(0, 5, (10,))) for _ in range(2)]
    return model, data


def hand_top_k(values: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the entries above the k-th smallest, k = int((1 - density) * N), by sorting."""
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    k = int((1 - density) * flat.numel())
    threshold = flat.sort().values[k - 1] if k > 0 else -torch.inf
    return {name: v > threshold for name, v in values.items()}


def count(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.count_nonzero()) for m in masks.values())


# ---------------------------------------------------------------------------------------
# schedule


def test_exponential_densities():
    assert exponential_densities(0.01, 2) == pytest.approx([0.1, 0.01])
    assert exponential_densities(0.3, 1) == [0.3]
    schedule = exponential_densities(0.018, 100)
    assert len(schedule) == 100 and schedule[-1] == pytest.approx(0.018)
    ratios = [b / a for a, b in zip(schedule, schedule[1:])]
    assert ratios == pytest.approx([0.018 ** 0.01] * 99)
    assert exponential_densities(1.0, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "density, rounds, error, match",
    [
        (0.0, 10, ValueError, r"density must be in \(0, 1\]"),
        (1.5, 10, ValueError, r"density must be in \(0, 1\]"),
        (float("nan"), 10, ValueError, "density"),
        (0.5, 0, ValueError, "rounds must be >= 1"),
        (0.5, 2.0, TypeError, "rounds must be an int"),
        ("0.5", 2, TypeError, "density must be a float"),
    ],
)
def test_exponential_densities_rejects(density, rounds, error, match):
    with pytest.raises(error, match=match):
        exponential_densities(density, rounds)


# ---------------------------------------------------------------------------------------
# the loop


def test_one_round_magnitude_is_global_top_k():
    model, data = make()
    magnitudes = {w.name: w.param.detach().abs().clone() for w in prunable_weights(model)}
    masks = prune(model, data, density=0.2, rounds=1, method="magnitude", progress=False)
    expected = hand_top_k(magnitudes, 0.2)
    assert masks.keys() == expected.keys()
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    total = sum(v.numel() for v in magnitudes.values())
    assert count(masks) == total - int(0.8 * total)


def test_layer_scope_prunes_every_layer_to_the_density():
    model, data = make()
    magnitudes = {w.name: w.param.detach().abs().clone() for w in prunable_weights(model)}
    masks = prune(model, data, sparsity=0.7, rounds=1, scope="layer", method="magnitude", progress=False)
    for name, values in magnitudes.items():
        assert torch.equal(masks[name], hand_top_k({name: values}, 0.3)[name]), name
        assert int(masks[name].count_nonzero()) == values.numel() - int(0.7 * values.numel())


@pytest.mark.parametrize("method", ["magnitude", "synflow", "snip", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_final_density_after_rounds(method, scope):
    model, data = make()
    masks = prune(
        model, data, density=0.1, rounds=4, scope=scope, method=method,
        generator=torch.Generator().manual_seed(0) if method == "random" else None, progress=False,
    )
    # Scores have no ties and pruned weights score 0, below every kept one: each round keeps
    # exactly N - int((1 - d_r) N) of the N weights in its scope.
    sizes = [m.numel() for m in masks.values()]
    expected = (
        sum(sizes) - int(0.9 * sum(sizes)) if scope == "global" else sum(n - int(0.9 * n) for n in sizes)
    )
    assert count(masks) == expected
    assert [r[1] for r in density_report(model)] == [int(m.count_nonzero()) for m in masks.values()]


def test_masks_are_monotone_across_rounds():
    model, data = make()
    steps = list(prune_rounds(model, data, density=0.05, rounds=6, method="random",
                              generator=torch.Generator().manual_seed(3)))
    assert [step.index for step in steps] == list(range(1, 7))
    total = steps[0].total
    assert total == sum(w.param.numel() for w in prunable_weights(model))
    ones = {name: torch.ones_like(m) for name, m in steps[0].masks.items()}
    for before, step, d in zip([ones] + [s.masks for s in steps], steps, exponential_densities(0.05, 6)):
        assert step.density == d
        for name in before:
            assert not bool((step.masks[name] & ~before[name]).any()), f"{name} revived pruned weights"
        assert step.kept == count(step.masks) == total - int((1 - d) * total)


def test_prune_is_its_rounds_then_the_masks_on_the_model():
    """prune_rounds runs prune's rounds and leaves the model alone, also when stopped."""
    model, data = make()
    steps = list(prune_rounds(model, data, density=0.1, rounds=4, method="magnitude"))
    assert not any(torch_prune.is_pruned(m) for m in model.modules())
    final = prune(model, data, density=0.1, rounds=4, method="magnitude", progress=False)
    assert final.keys() == steps[-1].masks.keys()
    assert all(torch.equal(final[name], steps[-1].masks[name]) for name in final)

    model, data = make()
    with contextlib.closing(prune_rounds(model, data, density=0.1, rounds=4, method="magnitude")) as rounds:
        first = next(rounds)
    assert first.index == 1 and first.kept < first.total
    assert not any(torch_prune.is_pruned(m) for m in model.modules())


def test_result_is_a_torch_pruned_model():
    model, data = make()
    masks = prune(model, data, density=0.3, rounds=2, method="magnitude", progress=False)
    x = data[0][0]
    out = model(x)
    for w in prunable_weights(model):
        assert torch_prune.is_pruned(w.module)
        assert w.param_name.endswith("weight_orig")
        assert torch.equal(w.carried_mask.bool(), masks[w.name])
        assert torch.equal(w.module.weight, w.param * w.carried_mask)
    assert out.shape == (10, 5)


def test_pruning_a_pruned_model_keeps_pruned_weights_and_one_hook():
    model, data = make()
    first = prune(model, data, density=0.5, rounds=1, method="random", progress=False)
    second = prune(model, data, density=0.2, rounds=1, method="magnitude", progress=False)
    for w in prunable_weights(model):
        assert not bool((second[w.name] & ~first[w.name]).any())
        hooks = list(w.module._forward_pre_hooks.values())
        assert len(hooks) == 1 and isinstance(hooks[0], torch_prune.CustomFromMask)
        assert torch.equal(w.carried_mask.bool(), second[w.name])
        # the module attribute reflects the new mask before any forward pass
        assert torch.equal(w.module.weight, w.param * w.carried_mask)


def test_apply_masks_sets_and_reports():
    model, _ = make()
    weights = prunable_weights(model)
    masks = {weights[0].name: torch.zeros(weights[0].shape, dtype=torch.bool)}
    apply_masks(model, masks)
    report = density_report(model)
    assert report[0] == (weights[0].name, 0, weights[0].param.numel(), 0.0)
    assert all(kept == total and density == 1.0 for _, kept, total, density in report[1:])
    assert not torch_prune.is_pruned(prunable_weights(model)[1].module)
    with pytest.raises(KeyError, match="not prunable weights"):
        apply_masks(model, {"nope.weight": torch.ones(1)})


def test_scores_of_the_pruned_model_see_its_masks():
    model, data = make()
    masks = prune(model, data, density=0.3, rounds=1, method="magnitude", progress=False)
    after = score("magnitude", model, data)
    for name, mask in masks.items():
        assert bool((after[name][~mask] == 0).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=1.5), ValueError, r"density must be in \(0, 1\]"),
        (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(density=0.5, sparsity=0.5), ValueError, "exactly one of density"),
        (dict(), ValueError, "exactly one of density"),
        (dict(density="0.5"), TypeError, "density must be a float"),
        (dict(density=0.5, scope="local"), ValueError, r"scope must be one of \['global', 'layer'\]"),
        (dict(density=0.5, method="l1"), ValueError, "unknown pruning method 'l1': supported are"),
        (dict(density=0.5, rounds=0), ValueError, "rounds must be >= 1"),
        (dict(density=0.5, method="magnitude", bn="eval"), TypeError, "does not take option"),
        (dict(density=0.5, bnn="eval"), TypeError,
         r"method 'px' does not take option\(s\) \['bnn'\]; its options are \['bn', 'keep', 'dtype', 'backend'\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, data = make()
    with pytest.raises(error, match=match):
        prune(model, data, progress=False, **kwargs)
    with pytest.raises(error, match=match):  # when called, before any round runs
        prune_rounds(model, data, **kwargs)
    assert not any(torch_prune.is_pruned(m) for m in model.modules())


@pytest.mark.parametrize("data", [[], iter([])], ids=["list", "iterator"])
def test_empty_data(data):
    model, _ = make()
    with pytest.raises(ValueError, match="data is empty"):
        prune(model, data, density=0.5, rounds=1, method="snip", progress=False)
    with pytest.raises(ValueError, match="data is None"):
        prune(model, None, density=0.5, rounds=1, method="magnitude", progress=False)


def test_one_shot_iterator_serves_every_round():
    model, data = make()
    masks = prune(model, iter(data), density=0.1, rounds=3, method="snip", progress=False)
    total = sum(m.numel() for m in masks.values())
    assert count(masks) == total - int(0.9 * total)


def test_px_prunes_to_the_density():
    pytest.importorskip("pxkern.px.scores")
    model, data = make()
    masks = prune(model, data, density=0.1, rounds=3, method="px", progress=False)
    total = sum(m.numel() for m in masks.values())
    assert count(masks) <= total - int(0.9 * total)
    assert count(masks) >= 0.9 * (total - int(0.9 * total))


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize("density", [0.9, 0.3, 0.04, 0.001])
def test_global_threshold_is_the_kth_smallest(zero_fraction, negatives, density):
    """The threshold equals the k-th smallest of a full sort, whichever subset the
    selection runs on (many zeros, negative scores, k inside or past the zeros)."""
    from pxkern.pruning.threshold import global_threshold

    generator = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(shape, generator=generator) for name, shape in (("a", (50, 40)), ("b", (3000,)))}
    for s in scores.values():
        s[torch.rand(s.shape, generator=generator) < zero_fraction] = 0
        if negatives:
            s[torch.rand(s.shape, generator=generator) < 0.1] *= -1
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int((1 - density) * flat.numel())
    assert global_threshold(scores, density) == flat.sort().values[k - 1].item()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_keep_ties_keeps_a_positive_threshold_only(scope):
    """keep_ties adds the entries equal to a positive threshold, never zeros."""
    from pxkern.pruning.threshold import global_keep_masks, layer_keep_masks

    keep = {"global": global_keep_masks, "layer": layer_keep_masks}[scope]
    tied = {"w": torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])}  # k = 3: threshold 1
    assert keep(tied, 0.5)["w"].tolist() == [False, False, False, False, True, True]
    assert keep(tied, 0.5, keep_ties=True)["w"].tolist() == [False, False, True, True, True, True]
    zeros = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])}  # k = 4: threshold 0
    assert keep(zeros, 0.2, keep_ties=True)["w"].tolist() == [False] * 4 + [True, True]
