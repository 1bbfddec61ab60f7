"""pxkern::keep_top and its PyTorch path against a sort-based reference of the top-k rule:
float32 and float64, global and per tensor, ties kept or not, with and without old masks,
over scores with ties, zeros of both signs, negatives and infinities, around the sizes at
which the radix select changes its way."""

from __future__ import annotations

import math

import pytest
import torch

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.ops.keep_top import keep_top

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not EXTENSION_AVAILABLE, reason="no extension"))]


def reference(scores, density, per_tensor, keep_ties, masks):
    """Threshold from a full sort, then the rule entry by entry."""
    def threshold(values):
        flat = torch.cat([v.reshape(-1) for v in values]).double()
        k = int((1.0 - density) * flat.numel())
        return -math.inf if k == 0 else float(flat.sort().values[k - 1])

    thresholds = [threshold([s]) for s in scores] if per_tensor else [threshold(scores)] * len(scores)
    kept = []
    for s, t in zip(scores, thresholds):
        k = s.double() > t
        if keep_ties and t > 0:
            k |= s.double() == t
        kept.append(k)
    if masks is not None:
        kept = [k & m for k, m in zip(kept, masks)]
    return kept


def scores_like(kind: str, sizes, dtype, generator):
    out = []
    for n in sizes:
        if kind == "ties":  # few distinct values, a third exact zeros (pruned weights)
            s = torch.randint(0, 7, (n,), generator=generator).to(dtype) / 4
            s[torch.rand(n, generator=generator) < 0.33] = 0
        elif kind == "signed":  # negatives, zeros of both signs, infinities
            s = torch.randn(n, generator=generator, dtype=dtype) * 10.0 ** torch.randint(-30, 30, (n,), generator=generator)
            s[torch.rand(n, generator=generator) < 0.1] = 0.0
            s[torch.rand(n, generator=generator) < 0.1] = -0.0
            if n > 3:
                s[0], s[1] = math.inf, -math.inf
        elif kind == "zeros":
            s = torch.zeros(n, dtype=dtype)
        else:  # "uniform"
            s = torch.rand(n, generator=generator, dtype=dtype)
        out.append(s.reshape(-1, 1) if n % 2 == 0 else s)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signed", "zeros"])
@pytest.mark.parametrize("sizes", [(1,), (5, 3), (300, 4000, 17), (70000, 9000)], ids=["1", "8", "4317", "79000"])
@pytest.mark.parametrize("density", [1.0, 0.9, 0.37, 0.01, 1e-9])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_matches_the_sorted_rule(monkeypatch, backend, dtype, kind, sizes, density, per_tensor):
    monkeypatch.setenv("PXKERN_BACKEND", backend)
    generator = torch.Generator().manual_seed(hash((kind, sizes, density)) % 2**31)
    scores = scores_like(kind, sizes, dtype, generator)
    masks = [torch.rand(s.shape, generator=generator) < 0.8 for s in scores]
    for keep_ties in (False, True):
        for given in (None, masks):
            kept, count, nan_index = keep_top(scores, density, per_tensor=per_tensor, keep_ties=keep_ties,
                                              masks=given)
            expected = reference(scores, density, per_tensor, keep_ties, given)
            assert nan_index == -1
            assert [k.dtype for k in kept] == [torch.bool] * len(scores)
            assert all(torch.equal(k, e) for k, e in zip(kept, expected)), (keep_ties, given is not None)
            assert count == sum(int(e.sum()) for e in expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_is_reported_by_tensor(monkeypatch, backend, dtype):
    monkeypatch.setenv("PXKERN_BACKEND", backend)
    scores = [torch.rand(10, dtype=dtype), torch.rand(3, 4, dtype=dtype), torch.rand(5, dtype=dtype)]
    scores[1][2, 1] = -math.nan
    assert keep_top(scores, 0.5) == ([], 0, 1)


def test_backends_agree_on_a_pruning_round():
    """The scores of a ResNet-20 prune round (many exact zeros) under its old masks."""
    if not EXTENSION_AVAILABLE:
        pytest.skip("no extension")
    from pxkern.models import cifar_resnet
    from pxkern.pruning import prune_rounds

    torch.manual_seed(0)
    model, x = cifar_resnet(20), torch.randn(8, 3, 32, 32)
    steps = list(prune_rounds(model, x, density=0.05, rounds=3))
    masks = list(steps[-1].masks.values())
    scores = [torch.rand(m.shape) * m for m in masks]
    cpp = keep_top(scores, 0.02, masks=masks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PXKERN_BACKEND", "torch")
        torch_path = keep_top(scores, 0.02, masks=masks)
    assert cpp[1:] == torch_path[1:]
    assert all(torch.equal(a, b) for a, b in zip(cpp[0], torch_path[0]))


def test_bad_masks():
    with pytest.raises(ValueError, match="one per score tensor, shaped like it"):
        keep_top([torch.rand(3)], 0.5, masks=[torch.ones(4, dtype=torch.bool)])


@pytest.mark.skipif(not EXTENSION_AVAILABLE, reason="no extension")
@pytest.mark.parametrize("with_masks", [False, True])
def test_opcheck(with_masks):
    scores = [torch.rand(4, 3), torch.rand(7)]
    masks = [torch.rand(s.shape) < 0.5 for s in scores] if with_masks else []
    torch.library.opcheck(torch.ops.pxkern.keep_top.default, (scores, masks, 0.4, False, True))
