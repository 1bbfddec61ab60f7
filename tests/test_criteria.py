"""Each pruning criterion against an independent plain-PyTorch reference.

The references work on deep copies of the model (hooks, in-place changes, ``.backward``
are all allowed there) and follow the official implementation (iurada/px-ntk-pruning,
``lib/pruners.py``); the library evaluates the untouched model functionally.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pxkern.pruning import CRITERIA, score
from pxkern.pruning.criteria import GRASP_EPS, GRASP_TEMPERATURE
from pxkern.weights import prunable_weights


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    )


MODELS = {"mlp": mlp, "cnn_bn": cnn_bn}
INPUTS = {"mlp": (12,), "cnn_bn": (3, 4, 4)}


def make(name: str, seed: int = 0):
    """A model with non-trivial BN statistics/affine, labelled data (two batches) and random masks."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    data = [(torch.randn(8, *INPUTS[name]), torch.randint(0, 3, (8,))) for _ in range(2)]
    masks = {w.name: torch.rand(w.shape) > 0.3 for w in prunable_weights(model)}
    return model, data, masks


def assert_scores_close(actual: dict, expected: dict, rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for name, ref in expected.items():
        got = actual[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
        assert torch.equal(ref[~finite], got[~finite].to(ref.dtype)), f"{name}: infinite entries differ"
        ref_f, got_f = ref[finite].double(), got[finite].double()
        scale = ref_f.abs().max().item() if ref_f.numel() else 0.0
        err = (got_f - ref_f).abs()
        if err.numel() and err.max().item() > rel * scale:
            i = int(err.argmax())
            raise AssertionError(
                f"{name}: max abs error {err.max().item():.3e} > {rel} * {scale:.3e} "
                f"at finite entry {i} (got {got_f[i].item():.6e}, expected {ref_f[i].item():.6e})"
            )


def masked_copy(model: nn.Module, masks: dict, mask_requires_grad: bool = False) -> nn.Module:
    """A deep copy whose prunable weights carry ``masks`` through torch.nn.utils.prune."""
    clone = copy.deepcopy(model)
    for w in prunable_weights(clone):
        torch_prune.custom_from_mask(w.module, "weight", masks[w.name])
        w.module.weight_mask.requires_grad_(mask_requires_grad)
    return clone


# ---------------------------------------------------------------------------------------
# references


def snip_reference(model, data, masks):
    """Mask-gradient formulation: |dL/dM| accumulated by .backward over batches, BN in
    train mode, normalized by the sum of all entries; masked entries then set to 0."""
    clone = masked_copy(model, masks, mask_requires_grad=True).train()
    for x, y in data:
        nn.functional.cross_entropy(clone(x), y).backward()
    grads = {w.name: w.module.weight_mask.grad.abs() for w in prunable_weights(clone)}
    norm = sum(g.sum() for g in grads.values())
    return {name: (g / norm) * masks[name] for name, g in grads.items()}


def grasp_reference(model, data, masks):
    """Hessian-gradient product by torch.autograd.functional.hvp, in float64."""
    clone = copy.deepcopy(model).double().train()
    weights = prunable_weights(clone)
    names = [w.param_name for w in weights]
    thetas = tuple(w.param.detach().clone() for w in weights)
    mask64 = [masks[w.name].double() for w in weights]

    def loss(*params):
        substitutes = {name: p * m for name, p, m in zip(names, params, mask64)}
        total = 0.0
        for x, y in data:
            # fresh BN buffers per batch so that every evaluation sees the same statistics
            buffers = {k: b.clone() for k, b in clone.named_buffers()}
            logits = torch.func.functional_call(clone, {**buffers, **substitutes}, (x.double(),))
            total = total + nn.functional.cross_entropy(logits / GRASP_TEMPERATURE, y)
        return total

    g = torch.autograd.grad(loss(*[t.requires_grad_() for t in thetas]), thetas)
    _, hg = torch.autograd.functional.hvp(loss, thetas, g)
    raw = [h * t.detach() for h, t in zip(hg, thetas)]
    norm = sum(r.sum() for r in raw).abs() + GRASP_EPS
    return {
        w.name: (r / norm).masked_fill(~masks[w.name], -torch.inf) for w, r in zip(weights, raw)
    }


def synflow_reference(model, data, masks):
    """abs'd float64 deep copy in eval mode, weights |W| * M, ones input, .backward."""
    clone = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in clone.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
        for w in prunable_weights(clone):
            w.param.mul_(masks[w.name])
    x = data[0][0]
    clone(torch.ones((1, *x.shape[1:]), dtype=torch.float64)).sum().backward()
    raw = {w.name: (w.param.grad * w.param).abs() for w in prunable_weights(clone)}
    largest = max(r.max() for r in raw.values())
    return {name: r / largest for name, r in raw.items()}


def magnitude_reference(model, data, masks):
    return {w.name: w.param.detach().abs() * masks[w.name] for w in prunable_weights(model)}


REFERENCES = {
    "snip": snip_reference,
    "grasp": grasp_reference,
    "synflow": synflow_reference,
    "magnitude": magnitude_reference,
}


# ---------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_matches_reference(method, model_name):
    model, data, masks = make(model_name)
    expected = REFERENCES[method](model, data, masks)
    assert_scores_close(score(method, model, data, masks), expected, rel=1e-6 if method == "magnitude" else 1e-4)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_carried_masks_equal_explicit_masks(method, model_name):
    model, data, masks = make(model_name)
    explicit = score(method, model, data, masks)
    carried = score(method, masked_copy(model, masks), data)
    assert_scores_close(carried, explicit, rel=1e-5)
    for name, s in explicit.items():
        masked_value = -torch.inf if method == "grasp" else 0.0
        assert bool((s[~masks[name]] == masked_value).all()), f"{method}: masked entries of {name}"
        if method != "grasp":
            assert bool((s >= 0).all()), f"{method}: negative scores in {name}"


def test_random_is_reproducible_and_excludes_masked():
    model, data, masks = make("cnn_bn")
    first = score("random", model, data, masks, generator=torch.Generator().manual_seed(7))
    again = score("random", model, data, masks, generator=torch.Generator().manual_seed(7))
    other = score("random", model, data, masks, generator=torch.Generator().manual_seed(8))
    for name, s in first.items():
        assert torch.equal(s, again[name])
        assert not torch.equal(s, other[name])
        assert bool((s[~masks[name]] == 0).all())
        kept = s[masks[name]]
        assert bool(((kept > 0) & (kept <= 1)).all())


def snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(k, id(p)) for k, p in model.named_parameters()],
        "attrs": {
            (name, key): value
            for name, m in model.named_modules()
            for key, value in m.__dict__.items()
            if isinstance(value, torch.Tensor)
        },
        "modes": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    }


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_model_untouched(method, training, pruned):
    if method == "px":
        pytest.importorskip("pxkern.px.scores")
    model, data, masks = make("cnn_bn")
    if pruned:
        model = masked_copy(model, masks)
    model.train(training)
    before = snapshot(model)
    score(method, model, data, None if pruned else masks)
    after = snapshot(model)
    assert before["params"] == after["params"]
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"].keys() == after["attrs"].keys()
    assert all(before["attrs"][k] is after["attrs"][k] for k in before["attrs"]), "module attributes replaced"
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{method} changed {key}"
    assert all(p.grad is None for p in model.parameters()), f"{method} left gradients"


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_labels_required(method):
    model, data, masks = make("mlp")
    with pytest.raises(ValueError, match="needs labels"):
        score(method, model, [x for x, _ in data], masks)
    with pytest.raises(ValueError, match="data is empty"):
        score(method, model, [], masks)


def test_unknown_method_and_option():
    model, data, masks = make("mlp")
    with pytest.raises(ValueError, match="unknown pruning method 'l1'.*'magnitude'"):
        score("l1", model, data, masks)
    with pytest.raises(TypeError, match="does not take option"):
        score("magnitude", model, data, masks, bn="eval")
    seeded = score("snip", model, data, masks, generator=torch.Generator().manual_seed(0))
    plain = score("snip", model, data, masks)
    assert all(torch.equal(seeded[k], plain[k]) for k in plain), "deterministic criteria ignore generator"


def test_snip_eval_batchnorm_uses_running_statistics():
    model, data, masks = make("cnn_bn")
    train = score("snip", model, data, masks, bn="batch")
    evaluated = score("snip", model, data, masks, bn="eval")
    assert any(not torch.allclose(train[k], evaluated[k]) for k in train)
    clone = masked_copy(model, masks, mask_requires_grad=True).eval()
    for x, y in data:
        nn.functional.cross_entropy(clone(x), y).backward()
    grads = {w.name: w.module.weight_mask.grad.abs() for w in prunable_weights(clone)}
    norm = sum(g.sum() for g in grads.values())
    assert_scores_close(evaluated, {n: g / norm * masks[n] for n, g in grads.items()})


def test_px_forwards_to_px_scores():
    scores_module = pytest.importorskip("pxkern.px.scores")
    model, data, masks = make("mlp")
    inputs = [x for x, _ in data]
    expected = scores_module.px_scores(model, inputs, masks=masks)
    actual = score("px", model, inputs, masks)
    for name in expected:
        assert torch.equal(actual[name], expected[name])
