"""Block-pruned models served with pxkern.sparsify against the same models dense.

Models, block-pruned by magnitude layer by layer, each layer to ``--density`` of its blocks
(32x32 by default; at least one), so that every layer has the work of that density. A
global ranking would not: torchvision's initialization scales weights by their fan-out, so
it prunes ResNet-50's 7x7 stem and every 3x3 layer away whole and keeps the 1x1 layers
dense, and the sparse model's time is then mostly that of skipping a third of its layers.
- ``vit-b mlp``: the 12 residual MLP blocks of ViT-B (Linear 768->3072, ReLU,
  Linear 3072->768) on 197 tokens per image, batch 1 and 64;
- ``resnet50``: torchvision's ResNet-50 layout at 224 px, batch 1 (the 7x7 stem and the
  classifier, whose shapes the block does not divide, stay dense).
Baselines in the same run: the dense model (MKL/oneDNN), and the same pruned model with its
Linear weights as ``torch.sparse_bsr`` tensors (PyTorch has no block-sparse convolution, so
for ResNet-50 that baseline is the dense model again).
``inference_mode``; times are medians of ``--repeats`` interleaved repeats. The error
column: each converted layer against its masked dense original on random inputs.

Usage: python -m benchmarks.bench_sparse_inference [--density 0.1] [--json results/sparse_inference.json]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.common import interleaved_medians, print_table, write_json
from pxkern.models import resnet50
from pxkern.pruning import prune
from pxkern.sparse import sparsify


class ResidualMLP(nn.Module):
    """ViT-B's MLP block with its residual connection (which keeps a pruned stack alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(768, 3072), nn.Linear(3072, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def vit_b_mlp() -> nn.Module:
    return nn.Sequential(*[ResidualMLP() for _ in range(12)])


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


CASES = (
    Case("vit-b mlp, batch 1", vit_b_mlp, (197, 768)),
    Case("vit-b mlp, batch 64", vit_b_mlp, (64 * 197, 768)),
    Case("resnet50 224px, batch 1", resnet50, (1, 3, 224, 224)),
)


class TorchSparseLinear(nn.Module):
    """The baseline: PyTorch's own BSR tensor in F.linear's place."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_bsr(block)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.reshape(-1, x.shape[-1]).T).T
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def with_torch_sparse_linears(model: nn.Module, block: tuple[int, int]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.shape[0] % block[0] == 0 and module.weight.shape[1] % block[1] == 0:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TorchSparseLinear(module, block))
    return model


def pruned(case: Case, density: float, block: tuple[int, int]) -> nn.Module:
    """The model block-pruned by magnitude layer by layer (magnitude reads no data: one
    sample suffices); each layer keeps the fewest blocks that reach the density."""
    torch.manual_seed(0)
    model = case.build().eval()
    sample = torch.randn(1, *case.input_shape[1:])
    prune(model, sample, density=density, rounds=1, method="magnitude", block=block, scope="layer",
          progress=False)
    return model


def layer_error(dense: nn.Module, sparse: nn.Module, names: list[str], x: torch.Tensor) -> float:
    """Largest error of a converted layer against its masked dense original, relative to
    the largest output, on random inputs of the shapes the layers see. (Pruned to a block
    density of 0.1 by magnitude, ResNet-50's signal dies on the way: the kept blocks of
    consecutive layers need not connect. Its model outputs then agree trivially.)"""
    shapes = {}
    hooks = [dense.get_submodule(name).register_forward_hook(
        lambda _module, inputs, _output, name=name: shapes.__setitem__(name, inputs[0].shape)) for name in names]
    dense(x)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for name in names:
        layer_input = torch.randn(shapes[name], generator=generator)
        expected = dense.get_submodule(name)(layer_input)
        actual = sparse.get_submodule(name)(layer_input)
        worst = max(worst, float((actual - expected).abs().max() / expected.abs().max()))
    return worst


def run(case: Case, density: float, block: tuple[int, int], repeats: int) -> dict:
    dense = pruned(case, density, block)
    sparse = pruned(case, density, block)
    decisions = sparsify(sparse, block=block, format="bsr")
    baseline = with_torch_sparse_linears(pruned(case, density, block), block)
    x = torch.randn(case.input_shape)
    with torch.inference_mode():
        error = layer_error(dense, sparse, [d.name for d in decisions if d.kind == "bsr"], x)
        times = interleaved_medians({"dense": lambda: dense(x), "pxkern": lambda: sparse(x),
                                     "torch_bsr": lambda: baseline(x)}, repeats=repeats)
    return {
        "model": case.name, "density": density, "block": list(block),
        "converted_layers": sum(d.kind == "bsr" for d in decisions), "layers": len(decisions),
        "dense_ms": times["dense"] * 1e3, "pxkern_ms": times["pxkern"] * 1e3,
        "torch_bsr_ms": times["torch_bsr"] * 1e3,
        "speedup_vs_dense": times["dense"] / times["pxkern"],
        "speedup_vs_torch_bsr": times["torch_bsr"] / times["pxkern"],
        "max_relative_error": error,
    }


COLUMNS = (
    ("model", "model", ""), ("converted_layers", "bsr layers", "d"), ("dense_ms", "dense ms", ".2f"),
    ("torch_bsr_ms", "torch bsr ms", ".2f"), ("pxkern_ms", "pxkern ms", ".2f"),
    ("speedup_vs_dense", "x dense", ".2f"), ("speedup_vs_torch_bsr", "x torch bsr", ".2f"),
    ("max_relative_error", "layer rel err", ".1e"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of weight blocks kept")
    parser.add_argument("--block", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=[c.name for c in CASES])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        if case.name in args.models:
            rows.append(run(case, args.density, tuple(args.block), args.repeats))
            print_table(rows[-1:], COLUMNS)
    print(f"\nblock-pruned to block density {args.density}, blocks {args.block[0]}x{args.block[1]}")
    print_table(rows, COLUMNS)
    write_json(args.json, "sparse_inference", vars(args), rows)


if __name__ == "__main__":
    main()
