"""BatchNorm folding in streams A and B (pxkern.px.folding): which convolutions it folds,
that scores stay those of the float64 reference with the plan learned by one call and
used by the next, and that a plan the forward no longer fits is detected, never used.
Folding is the stream path's (``backend="torch"``; the fused plan folds per layer group).

Tolerance: as in test_px_scores, per layer max |s - s_ref| <= 1e-4 * max |s_ref|.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import zoo
from pxkern import px_scores
from pxkern.px.folding import plan_for
from pxkern.testing import assert_same_topk_masks, assert_scores_close, reference_px_scores

def conv1d_bn_net(batch: int = 4, seed: int = 0) -> zoo.Example:
    def build() -> zoo.Example:
        model = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Conv1d(8, 8, 3, stride=2, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 9, 5))
        return model.eval(), torch.randn(batch, 3, 20)

    return zoo._seeded(build, seed)


MODELS = {"resnet20": zoo.resnet20, "vgg16_bn": zoo.vgg16, "resnet18_tv": zoo.resnet18_tv,
          "conv1d_bn_net": conv1d_bn_net}


def _conv_batchnorm_pairs(model: nn.Module) -> set[str]:
    """Weights of convolutions whose output feeds only a BatchNorm, from the traced graph
    (independent of the run-time recorder)."""
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    pairs = set()
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv1d, nn.Conv2d)):
            continue
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], nn.modules.batchnorm._BatchNorm)):
            pairs.add(f"{node.target}.weight")
    return pairs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_holds_every_convolution_feeding_only_a_batchnorm(name):
    model, x = MODELS[name]()
    px_scores(model, x, backend="torch")
    expected = _conv_batchnorm_pairs(model)
    assert expected, f"{name}: the zoo model has no convolution followed by a BatchNorm"
    assert set(plan_for(model).norms) == expected


@pytest.mark.parametrize("density", [1.0, 0.4, 0.1])  # 0.1: sparse_conv2d with folded weights
@pytest.mark.parametrize("name", sorted(MODELS))
def test_scores_with_a_learned_plan_match_reference(name, density):
    # The first call learns the plan in A and folds B; the second folds A and B.
    model, x = MODELS[name]()
    zoo.randomize_norms(model)
    masks = None if density == 1.0 else zoo.random_masks(model, density)
    expected = reference_px_scores(model, x, masks=masks)
    for call in ("learns", "follows"):
        actual = px_scores(model, x, masks=masks, backend="torch")
        assert_scores_close(actual, expected)
        assert_same_topk_masks(actual, expected)
        assert plan_for(model).norms, f"{name}: nothing folded after the call that {call}"


class _Switchable(nn.Module):
    """conv -> BatchNorm -> ReLU -> classifier, with the convolution's output used in
    other ways on demand: a forward that changed since a plan was learned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
        self.use = "norm"

    def forward(self, x):
        y = self.conv(x)
        if self.use == "norm":
            z = self.bn(y)
        elif self.use == "norm plus raw":  # the raw output used again after the norm
            z = self.bn(y) + y
        elif self.use == "raw":  # never normalized
            z = y
        else:  # "raw before norm": used before the norm
            z = self.bn(y * 2.0)
        return self.head(torch.relu(z))


@pytest.mark.parametrize("use, folded", [("norm plus raw", False), ("raw", False),
                                         ("raw before norm", False), ("norm", True)])
def test_a_plan_the_forward_no_longer_fits_is_relearned(use, folded):
    torch.manual_seed(0)
    model = zoo.randomize_norms(_Switchable()).eval()
    x = torch.randn(5, 3, 6, 6)
    px_scores(model, x, backend="torch")
    assert set(plan_for(model).norms) == {"conv.weight"}
    model.use = use
    actual = px_scores(model, x, backend="torch")
    assert_scores_close(actual, reference_px_scores(model, x))
    assert ("conv.weight" in plan_for(model).norms) == folded


class _SharedConv(nn.Module):
    """One convolution applied twice, each output through its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        return self.head(torch.relu(self.bn2(self.conv(x))))


def test_a_convolution_called_twice_is_not_folded():
    torch.manual_seed(0)
    model = zoo.randomize_norms(_SharedConv()).eval()
    x = torch.randn(3, 4, 5, 5)
    actual = px_scores(model, x, backend="torch")
    assert not plan_for(model).norms
    assert_scores_close(actual, reference_px_scores(model, x))


def test_one_mask_object_for_two_weights():
    # Stream B's weights are the masks: one tensor object names no single layer, so its
    # layers are not folded in B (A's masked weights are separate tensors).
    model, x = zoo.resnet20()
    zoo.randomize_norms(model)
    masks = zoo.random_masks(model, 0.5)
    shared = masks["layers.0.conv1.weight"]
    masks["layers.0.conv2.weight"] = shared
    assert masks["layers.0.conv1.weight"].shape == masks["layers.0.conv2.weight"].shape
    expected = reference_px_scores(model, x, masks=masks)
    for _ in range(2):
        assert_scores_close(px_scores(model, x, masks=masks, backend="torch"), expected)


class _Alternating(_Switchable):
    """Uses the convolution output differently on every other forward call: stream A and
    stream B of one px_scores call see different structures."""

    def forward(self, x):
        self.use = "norm plus raw" if self.use == "norm" else "norm"
        return super().forward(x)


def test_stream_b_with_another_structure_than_a_is_an_error():
    torch.manual_seed(0)
    model = _Alternating().eval()
    model.use = "norm plus raw"  # the first forward (stream A) uses "norm"
    # A pruned weight: B's all-ones weights run as box filters, unfolded.
    masks = {"conv.weight": torch.rand(model.conv.weight.shape) < 0.5}
    with pytest.raises(RuntimeError, match="stream B used a convolution output differently"):
        px_scores(model, torch.randn(5, 3, 6, 6), masks=masks, backend="torch")
