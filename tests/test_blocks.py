"""Block-structured scores and block pruning against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zoo
from pxkern import px_scores
from pxkern.pruning import prune
from pxkern.pruning.blocks import block_mean_scores


def brute_force_block_means(score: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    matrix = score.reshape(score.shape[0], -1).double()
    out = torch.empty_like(matrix)
    bm, bn = block
    for r in range(0, matrix.shape[0], bm):
        for c in range(0, matrix.shape[1], bn):
            out[r:r + bm, c:c + bn] = matrix[r:r + bm, c:c + bn].mean()
    return out.reshape(score.shape)


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (10, 64), (32, 16, 3, 3), (7, 5)])
@pytest.mark.parametrize("block", [(8, 8), (4, 16), (3, 5), (1, 1), (64, 64)])
def test_block_means_match_brute_force(shape, block):
    score = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    actual = block_mean_scores({"w": score}, block)["w"]
    torch.testing.assert_close(actual.double(), brute_force_block_means(score, block), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block, message", [((0, 4), "positive"), ((4,), "pair"), ((2.5, 4), "pair"), ("8x8", "pair")])
def test_bad_blocks(block, message):
    with pytest.raises(ValueError, match=message):
        block_mean_scores({"w": torch.rand(8, 8)}, block)


def test_signed_scores_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        block_mean_scores({"w": torch.randn(8, 8)}, (4, 4))


def test_px_scores_by_block_are_block_means_of_px_scores():
    model, x = zoo.resnet20()
    masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
             for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}
    plain = px_scores(model, x, masks=masks)
    blocked = px_scores(model, x, masks=masks, block=(8, 8))
    expected = {k: v * masks[k] for k, v in block_mean_scores(plain, (8, 8)).items()}
    top = max(float(v.max()) for v in expected.values())
    for key in plain:
        torch.testing.assert_close(blocked[key], expected[key] / top, rtol=1e-5, atol=1e-7)
        assert bool((blocked[key][~masks[key]] == 0).all())


def _assert_block_uniform(mask: torch.Tensor, block: tuple[int, int], name: str) -> None:
    matrix = mask.reshape(mask.shape[0], -1)
    bm, bn = block
    for r in range(0, matrix.shape[0], bm):
        for c in range(0, matrix.shape[1], bn):
            tile = matrix[r:r + bm, c:c + bn]
            assert bool(tile.all()) or not bool(tile.any()), f"{name}: block ({r}, {c}) is split"


@pytest.mark.parametrize("method", ["px", "magnitude"])
def test_block_prune_keeps_whole_blocks(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(6, 3, 8, 8)
    density, block = 0.2, (4, 8)
    masks = prune(model, x, density=density, rounds=3, method=method, block=block, progress=False)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    for name, mask in masks.items():
        _assert_block_uniform(mask, block, name)
    # The block at the threshold stays, so the density may exceed the target by a block.
    assert density * total <= kept <= density * total + block[0] * block[1]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_layer_block_prune_keeps_a_block_of_every_layer(method):
    """Layer by layer, each weight keeps the fewest whole blocks that reach the density:
    the four 4x8 blocks of the 8x16 layer at density 0.1 leave one, not none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 64))  # 4 and 16 blocks
    block, density = (4, 8), 0.1
    masks = prune(model, torch.randn(5, 16), density=density, rounds=1, scope="layer", method=method,
                  block=block, generator=torch.Generator().manual_seed(0), progress=False)
    for name, mask in masks.items():
        _assert_block_uniform(mask, block, name)
        blocks = mask.numel() // (block[0] * block[1])
        assert int(mask.sum()) // (block[0] * block[1]) == math.ceil(density * blocks), name
