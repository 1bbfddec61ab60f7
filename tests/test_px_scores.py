"""px_scores against the float64 reference of the spec, over the model zoo.

Tolerances (px-spec.md section 5): per layer, max |s - s_ref| <= 1e-4 * max |s_ref| after
both are divided by their global maximum, and the same global top-k masks at densities
10% and 1% (ties at the threshold aside). float64 streams are held to 1e-6, the
rounding of the float32 scores they return.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import zoo
from pxkern import prune, px_scores
from pxkern.ops.bsr_dense_mm import bsr_linear
from pxkern.ops.bsr_px_scores import bsr_px_scores
from pxkern.px import scores, streams
from pxkern.px.streams import UnsupportedActivationError
from pxkern.testing import assert_same_topk_masks, assert_scores_close, reference_px_scores

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # scores are returned as float32


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zoo_matches_float64_reference(name, dtype):
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    expected = reference_px_scores(model, x)
    actual = px_scores(model, x, dtype=dtype)
    assert all(s.dtype == torch.float32 for s in actual.values())
    assert max(float(s.max()) for s in actual.values()) == 1.0
    assert_scores_close(actual, expected, rel=TOLERANCE[dtype])
    assert_same_topk_masks(actual, expected)


@pytest.mark.parametrize("density", [0.4, 0.1])  # 0.1 runs A and B through sparse_conv2d
@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg16_bn", "resnet18_tv", "conv1d_net"])
def test_masks_and_train_mode_model_untouched(name, density):
    model, x = zoo.ZOO[name]()
    zoo.randomize_norms(model)
    model.train()
    masks = zoo.random_masks(model, density)
    before = zoo.snapshot(model)
    actual = px_scores(model, x, masks=masks)
    zoo.assert_untouched(model, before)
    for key, mask in masks.items():
        assert bool((actual[key][~mask] == 0).all()), f"{key}: masked weights scored"
        assert bool((actual[key] >= 0).all())
    assert_scores_close(actual, reference_px_scores(model, x, masks=masks))


def test_carried_prune_masks_are_used_and_restored():
    model, x = zoo.resnet20()
    masks = zoo.random_masks(model, 0.3)
    explicit = px_scores(model, x, masks=masks)
    for name, module in model.named_modules():
        if f"{name}.weight" in masks:
            torch_prune.custom_from_mask(module, "weight", masks[f"{name}.weight"])
    before = zoo.snapshot(model)
    effective = {name: m.weight for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    carried = px_scores(model, x)
    zoo.assert_untouched(model, before)
    for name, m in model.named_modules():
        if hasattr(m, "weight_mask"):
            assert m.weight is effective[name], f"{name}.weight attribute was replaced"
    assert carried.keys() == explicit.keys()
    for key in explicit:
        torch.testing.assert_close(carried[key], explicit[key], rtol=1e-5, atol=1e-7)
    # Explicit masks replace the carried ones, also where they keep carried zeros.
    unpruned = {key: torch.ones_like(m) for key, m in masks.items()}
    assert_scores_close(px_scores(model, x, masks=unpruned), reference_px_scores(model, x, masks=unpruned))


def test_batches_and_pairs_accumulate_like_one_batch():
    model, x = zoo.resnet20()
    whole = px_scores(model, x)
    pairs = [(x[:1], torch.tensor([0])), (x[1:], torch.zeros(len(x) - 1))]
    split = px_scores(model, pairs)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep", [(), ("fc",), ("fc", "layers.0.conv1")])
def test_keep_sets(keep):
    model, x = zoo.resnet20()
    assert_scores_close(px_scores(model, x, keep=keep), reference_px_scores(model, x, keep=keep))


def test_batch_mode_warns_and_matches_reference_after_the_norm():
    # With bn="batch", C's constant input makes every BatchNorm output its beta, so the
    # weights before a BN get exactly zero scores (spec section 5) while the weights after
    # it keep a non-trivial exact score to compare.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
                          nn.ReLU(), nn.Linear(5, 3))
    zoo.randomize_norms(model)
    x = torch.randn(16, 6)
    with pytest.warns(UserWarning, match="rounding noise"):
        actual = px_scores(model, x, bn="batch", dtype=torch.float64)
    expected = reference_px_scores(model, x, bn="batch")
    assert float(actual["0.weight"].max()) < 1e-6
    after = ["3.weight", "5.weight"]
    assert_scores_close({k: actual[k] for k in after}, {k: expected[k] for k in after}, rel=1e-6)


def test_batch_mode_is_degenerate_on_resnet():
    model, x = zoo.resnet20()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_px_scores(model, x, bn="batch")
    exact = reference_px_scores(model, x)
    conv_peak = max(float(s.max()) for k, s in reference.items() if k != "fc.weight")
    assert conv_peak < 1e-8 * max(float(s.max()) for s in exact.values())


@pytest.mark.parametrize("factory", [lambda: zoo.resnet(depth=110, width=4, batch=2),
                                     lambda: zoo.vgg19(bn=False, width=8, batch=2),
                                     lambda: zoo.vgg16(bn=False, width=16, batch=2)],
                         ids=["resnet110", "vgg19", "vgg16"])
def test_deep_networks_are_finite_and_exact(factory):
    model, x = factory()
    actual = px_scores(model, x)
    assert all(bool(torch.isfinite(s).all()) for s in actual.values())
    assert_scores_close(actual, reference_px_scores(model, x))


def test_deeper_than_float64_range():
    # A bias-free ReLU MLP is positively homogeneous in its input and B is linear in X*X,
    # so the scores for input a*X equal those for X up to one global constant. With 400
    # layers the path values exceed float64 (2**1024): the reference overflows on X and
    # is exact on a small a*X, where pxkern must agree on the original X.
    torch.manual_seed(0)
    depth, width = 400, 16
    layers = [nn.Linear(8, width, bias=False), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 4, bias=False)).double()
    x = torch.rand(4, 8, dtype=torch.float64) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overflowing = reference_px_scores(model, x)
    assert not all(bool(torch.isfinite(s).all()) for s in overflowing.values())
    expected = reference_px_scores(model, x * 2.0**-500)
    assert all(bool(torch.isfinite(s).all()) for s in expected.values())
    actual = px_scores(model.float(), x.float())
    assert_scores_close(actual, expected)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class _Float64Scale(nn.Module):
    """Scales float64 values only: stream C (float64) sees the factor, float32 A and B not,
    and the float64 reference computes the same function (it divides back later)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor if x.dtype == torch.float64 else x


@pytest.mark.parametrize("scale, factor, a_reruns, c_reruns", [
    (_Scale, 1.0, False, False),
    (_Scale, 2.0**80, True, False),  # in float64's true-scale range (2**+-512)
    (_Scale, 2.0**-80, True, False),
    (_Float64Scale, 2.0**600, False, True),
    (_Float64Scale, 2.0**-600, False, True),
])
def test_streams_a_and_c_leave_true_scale_and_are_rerun_scaled(monkeypatch, scale, factor, a_reruns, c_reruns):
    # Streams A (float32) and C (float64) run without exponents unless a ReLU input or the
    # output leaves [2**-r, 2**r] (r = 64 for float32, 512 for float64); here a layer in
    # the middle of the net scales by a factor it later divides out (the output does not
    # show it), so the stream must be rerun scaled, and the scores must still match the
    # float64 reference. No biases: B's and C's constant terms would not be scaled, and
    # R = <z1, z2> would then grow like factor**2 in the reference too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), scale(factor),
                          nn.Linear(8, 8, bias=False), nn.ReLU(), scale(1 / factor), nn.Linear(8, 3, bias=False))
    x = torch.randn(5, 6)
    runs = {streams.Stream.GATES: [], streams.Stream.KERNEL: []}

    def counting(real_run_stream):
        def run_stream(model, state, *args, **kwargs):
            runs.get(state.stream, []).append(state.true_scale)
            return real_run_stream(model, state, *args, **kwargs)
        return run_stream

    monkeypatch.setattr(streams, "run_stream", counting(streams.run_stream))
    monkeypatch.setattr(scores, "run_stream", counting(scores.run_stream))
    actual = px_scores(model, x)
    assert runs[streams.Stream.GATES] == ([True, False] if a_reruns else [True])
    assert runs[streams.Stream.KERNEL] == ([True, False] if c_reruns else [True])
    assert_scores_close(actual, reference_px_scores(model, x))


class _WhereGate(nn.Module):
    """An op without an exponent rule (torch.where) takes the float64 fallback."""

    def forward(self, x):
        keep = torch.arange(x.shape[1]).reshape(1, -1, *[1] * (x.dim() - 2)) % 3 != 0
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


def test_unknown_ops_fall_back_to_exact_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), _WhereGate(), nn.Conv2d(6, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(5, 3, 8, 8)
    assert_scores_close(px_scores(model, x), reference_px_scores(model, x))


@pytest.mark.parametrize("factory, fragment", [
    (zoo.unsupported_activation_net, "GELU"),
    (zoo.sigmoid_net, "sigmoid"),
])
def test_unsupported_activations_are_named(factory, fragment):
    model, x = factory()
    with pytest.raises(UnsupportedActivationError, match="ReLU") as info:
        px_scores(model, x)
    assert fragment.lower() in str(info.value).lower()


@pytest.mark.parametrize("data, error, fragment", [
    ([], ValueError, "empty"),
    (torch.zeros(4, 20, dtype=torch.int64), TypeError, "floating"),
    (torch.zeros(0, 20), ValueError, "non-empty"),
    ([torch.zeros(2, 20), torch.zeros(2, 21)], ValueError, "sample shape"),
    (["not a tensor"], TypeError, "tensor"),
    ([torch.zeros(2, 20), torch.full((2, 20), float("nan"))], ValueError, "batch 1 contains NaN or infinite"),
    (torch.full((2, 20), float("inf")), ValueError, "batch 0 contains NaN or infinite"),
    (torch.zeros(2, 20).index_fill_(1, torch.tensor([13]), -float("inf")), ValueError,
     "batch 0 contains NaN or infinite"),
])
def test_bad_data(data, error, fragment):
    model, _ = zoo.mlp()
    with pytest.raises(error, match=fragment):
        px_scores(model, data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind, name, index", [
    ("parameter", "0.weight", (0, 0)),
    # Deep inside a weight large enough for a vectorized, multi-threaded reduction.
    ("parameter", "3.weight", (40_001, 2)),
    ("buffer", "1.running_var", (5,)),
])
def test_non_finite_model_values_are_named(kind, name, index, value):
    model = nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 65_536),
                          nn.ReLU(), nn.Linear(65_536, 3)).eval()
    with torch.no_grad():
        dict(getattr(model, f"named_{kind}s")())[name][index] = value
    with pytest.raises(ValueError, match=f"model {kind} '{name}' contains NaN or infinite"):
        px_scores(model, torch.randn(4, 20))


def test_bad_arguments():
    model, x = zoo.mlp()
    with pytest.raises(ValueError, match="bn must be"):
        px_scores(model, x, bn="train")
    with pytest.raises(KeyError, match="not prunable weights"):
        px_scores(model, x, masks={"nope.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        px_scores(model, x, masks={"0.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        px_scores(model, x, masks={"0.weight": torch.full((32, 20), 0.5)})
    with pytest.raises(KeyError, match="keep"):
        px_scores(model, x, keep=("classifier",))
    with pytest.raises(ValueError, match="no prunable weights"):
        px_scores(nn.Sequential(nn.ReLU()), x)
    with pytest.raises(TypeError, match="one tensor"):
        px_scores(_TupleOutput(), torch.randn(2, 4))


class _TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("call", [lambda m, x: px_scores(m, x),
                                  lambda m, x: prune(m, x, density=0.5, rounds=2, progress=False)])
def test_tied_weights_are_refused_by_name(call):
    with pytest.raises(NotImplementedError, match="'a' and 'b' share one weight tensor"):
        call(_TiedLinears(), torch.randn(4, 6))


class _TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x), x


def test_block_pruned_linear_layers_run_block_sparse(monkeypatch):
    """Later rounds of block pruning: Linear weights keeping few 16x16 blocks run streams
    A and B through the BSR kernel, stream C through its squared-weight form and score
    epilogue, with the scores of the dense evaluation."""
    import pxkern.px.streams as streams
    from pxkern._extension import EXTENSION_AVAILABLE

    if not EXTENSION_AVAILABLE:
        pytest.skip("the BSR kernel needs the pxkern._C extension")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(16, 64)
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for name in ("0.weight", "2.weight"):
        rows, cols = model.get_parameter(name).shape
        count = (rows // 16) * (cols // 16)
        blocks = torch.zeros(count, dtype=torch.bool)
        blocks[torch.randperm(count, generator=generator)[: count // 5]] = True  # 20% of the blocks
        blocks = blocks.reshape(rows // 16, cols // 16)
        masks[name] = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    products, scored = [], []

    def spy_linear(*args, square_weight=False):
        products.append((tuple(args[3]), square_weight))
        return bsr_linear(*args, square_weight=square_weight)

    def spy_scores(*args):
        scored.append(tuple(args[3]))
        return bsr_px_scores(*args)

    monkeypatch.setattr(streams, "bsr_linear", spy_linear)
    monkeypatch.setattr(streams, "bsr_px_scores", spy_scores)
    actual = px_scores(model, x, masks=masks)
    # A and B of both layers; C forward (squared) and its transposed backward.
    assert sorted(products) == sorted(
        [((96, 64), False)] * 2 + [((32, 96), False)] * 2
        + [((96, 64), True), ((32, 96), True), ((64, 96), True), ((96, 32), True)]
    )
    assert sorted(scored) == [(32, 96), (96, 64)], "the score epilogue of both layers"
    assert_scores_close(actual, reference_px_scores(model, x, masks=masks), rel=TOLERANCE[torch.float32])
    assert_same_topk_masks(actual, reference_px_scores(model, x, masks=masks))
    # A layer pruned whole has no blocks: zero scores, and the layers before it too.
    masks["2.weight"] = torch.zeros_like(masks["2.weight"])
    assert_scores_close(px_scores(model, x, masks=masks), reference_px_scores(model, x, masks=masks))
