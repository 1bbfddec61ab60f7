"""Block-structured scores: one score per weight block, so that pruning removes whole
blocks that block-sparse kernels can skip.

A weight is seen as the matrix ``[C_out, C_in * kh * kw]`` (a Linear weight as it is) and
cut into ``bm x bn`` blocks from the top left; blocks at the right and bottom edges may be
smaller when the block does not divide the matrix. A block's score is the **mean** of its
weights' scores, given back to every weight of the block:
- for equal blocks the mean ranks exactly like the sum (the block's first-order share of
  the objective, for PX the sum of ``|G| W**2``);
- unlike the sum it stays comparable across the smaller edge blocks, and the usual
  thresholds (``pxkern.pruning.threshold``) then keep or drop each block whole, counting
  density in weights as the unstructured rule does (blocks tied at the threshold go).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list)) or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(f"block must be a pair of positive ints (bm, bn), got {block!r}")
    return int(block[0]), int(block[1])


def block_mean_scores(scores: Mapping[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every score replaced by the mean score of its block; shapes are kept.

    Args:
        scores: ``{weight name: non-negative scores shaped like the weight}``.
        block: ``(bm, bn)`` rows and columns of a block of the ``[C_out, rest]`` matrix.
    """
    bm, bn = check_block(block)
    averaged = {}
    for name, score in scores.items():
        if score.dim() < 2:
            raise ValueError(f"scores[{name!r}] has shape {tuple(score.shape)}: block scores need a weight matrix")
        if bool((score < 0).any()):
            raise ValueError(
                f"scores[{name!r}] has negative entries: block scores average non-negative "
                f"scores (px, synflow, snip, magnitude, random), not signed ones (grasp)"
            )
        matrix = score.reshape(score.shape[0], -1)
        rows, cols = matrix.shape
        # ceil_mode averages the overhanging edge windows over their valid entries only.
        means = F.avg_pool2d(matrix[None, None], (bm, bn), (bm, bn), ceil_mode=True)[0, 0]
        expanded = means.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
        averaged[name] = expanded.reshape(score.shape).contiguous()
    return averaged
