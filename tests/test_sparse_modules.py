"""Block-sparse modules and sparsify: outputs equal the masked dense model.

Tolerance (fp32): 1e-5 relative to the largest output, as asked of sparsify; float64
references for the modules themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from pxkern import sparsify
from pxkern.pruning import prune
from pxkern.sparse import BlockSparseConv2d, BlockSparseLinear


def block_pruned(weight: torch.Tensor, block: tuple[int, int], density: float, seed: int = 0) -> torch.Tensor:
    matrix = weight.reshape(weight.shape[0], -1)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(matrix.shape[0] // block[0], matrix.shape[1] // block[1], generator=generator) < density
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (matrix * mask).reshape(weight.shape)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs().max()
    assert error <= rel * scale, f"max error {float(error):.3g} > {rel} * {float(scale):.3g}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, block, batch", [((96, 160), (16, 32), (5,)), ((64, 64), (8, 8), (3, 7)), ((32, 48), (16, 16), ())])
@pytest.mark.parametrize("density", [0.3, 0.0, 1.0])
def test_block_sparse_linear(bias, shape, block, batch, density):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(block_pruned(linear.weight, block, density))
    sparse = BlockSparseLinear.from_linear(linear, block)
    x = torch.randn(*batch, shape[1])
    expected = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    assert_close_to(sparse(x), expected)


def test_block_sparse_linear_follows_changes_to_its_values():
    """The transposed blocks the layer keeps are made again when values change in place,
    are replaced by a state dict of another sparsity, or are converted; made once
    otherwise."""
    torch.manual_seed(0)
    linears = [nn.Linear(64, 32), nn.Linear(64, 32)]
    with torch.no_grad():
        for i, linear in enumerate(linears):
            linear.weight.copy_(block_pruned(linear.weight, (16, 16), 0.5, seed=i))
    sparse = BlockSparseLinear.from_linear(linears[0], (16, 16))
    x = torch.randn(5, 64)

    def expected(linear: nn.Linear, weight_scale: float = 1.0) -> torch.Tensor:
        return F.linear(x.double(), weight_scale * linear.weight.double(), linear.bias.double())

    assert_close_to(sparse(x), expected(linears[0]))
    assert sparse._transposed() is sparse._transposed()
    with torch.no_grad():
        sparse.values.mul_(2)
    assert_close_to(sparse(x), expected(linears[0], 2.0))
    other = BlockSparseLinear.from_linear(linears[1], (16, 16))
    assert other.values.shape != sparse.values.shape
    sparse.load_state_dict(other.state_dict())
    assert_close_to(sparse(x), expected(linears[1]))
    sparse.double()
    assert_close_to(sparse(x.double()), expected(linears[1]))
    with torch.inference_mode():
        fresh = BlockSparseLinear.from_linear(linears[0], (16, 16))
        assert_close_to(fresh(x), expected(linears[0]))
    assert_close_to(fresh(x), expected(linears[0]))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_block_sparse_conv2d(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(block_pruned(conv.weight, (8, 8), 0.4))
    sparse = BlockSparseConv2d.from_conv2d(conv, (8, 8))
    x = torch.randn(3, 8, 11, 13)
    expected = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                        stride, padding, dilation)
    assert_close_to(sparse(x), expected)


def test_unsupported_convolutions_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        BlockSparseConv2d.from_conv2d(nn.Conv2d(8, 8, 3, groups=2), (4, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        BlockSparseConv2d.from_conv2d(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), (4, 4))


def _mlp_and_cnn():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
    cnn = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16))
    return [(mlp, torch.randn(12, 64)), (cnn, torch.randn(4, 8, 10, 10))]


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "cnn"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_sparsify_block_pruned_models(index, context):
    model, x = _mlp_and_cnn()[index]
    prune(model, x, density=0.2, rounds=2, method="magnitude", block=(8, 8), progress=False)
    with torch.no_grad():
        expected = model(x)
    decisions = sparsify(model, block=(8, 8), format="bsr")
    converted = [d.name for d in decisions if d.kind == "bsr"]
    assert converted, decisions
    assert all(isinstance(model.get_submodule(name), (BlockSparseLinear, BlockSparseConv2d)) for name in converted)
    with context():
        assert_close_to(model(x), expected)


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "cnn"])
def test_sparsified_models_run_through_the_triton_kernels(index, monkeypatch):
    """PXKERN_BACKEND=triton sends the sparse modules to the Triton BSR kernels (the
    interpreter here, the GPU path on CUDA) with the outputs of the dense model."""
    model, x = _mlp_and_cnn()[index]
    prune(model, x, density=0.3, rounds=1, method="magnitude", block=(16, 16), progress=False)
    with torch.no_grad():
        expected = model(x)
    sparsify(model, block=(16, 16), format="bsr")
    monkeypatch.setenv("PXKERN_BACKEND", "triton")
    with torch.inference_mode():
        assert_close_to(model(x), expected)


@pytest.mark.gpu
def test_sparsified_models_run_on_cuda():
    model, x = _mlp_and_cnn()[0]
    prune(model, x, density=0.3, rounds=1, method="magnitude", block=(16, 16), progress=False)
    with torch.no_grad():
        expected = model(x)
    sparsify(model, block=(16, 16), format="bsr")
    with torch.inference_mode():
        assert_close_to(model.cuda()(x.cuda()).cpu(), expected)


def _pruned(index: int, density: float, block: tuple[int, int]):
    """A fresh block-pruned model (pruned models cannot be deep-copied: torch's prune keeps
    a non-leaf tensor on the module)."""
    model, x = _mlp_and_cnn()[index]
    prune(model, x, density=density, rounds=1, method="magnitude", block=block, progress=False)
    return model, x


def test_sparsify_state_dict_round_trips():
    model, x = _pruned(1, 0.3, (8, 8))
    sparsify(model, block=(8, 8), format="bsr")
    # A twin with another sparsity pattern loads the first model's blocks whole.
    twin, _ = _pruned(1, 0.6, (8, 8))
    sparsify(twin, block=(8, 8), format="bsr")
    assert any(a.shape != b.shape for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close_to(twin(x), model(x), rel=1e-6)


def test_sparsify_formats_and_choices():
    assert all(d.kind == "dense" for d in sparsify(_pruned(0, 0.1, (16, 16))[0], format="dense"))
    # block=None picks the largest blocks that store few extra zeros: the 16x16 pruning
    # pattern, or larger blocks where a layer came out empty or full.
    model, _ = _pruned(0, 0.1, (16, 16))
    density = {name: float((m.weight != 0).float().mean()) for name, m in model.named_modules()
               if isinstance(m, nn.Linear)}
    chosen = [d for d in sparsify(model, format="bsr") if d.kind == "bsr"]
    assert (16, 16) in {d.block for d in chosen}
    for d in chosen:
        assert d.block == (16, 16) or density[d.name] in (0.0, 1.0), d
        assert d.block_density <= 1.25 * density[d.name] + 1e-9, d
    model, x = _pruned(0, 0.1, (16, 16))
    measured = sparsify(model, example_input=x)
    assert all("measured" in d.reason for d in measured if d.block is not None)
    with pytest.raises(ValueError, match="format"):
        sparsify(model, format="csr")
    for block in ((0, 4), (8,), (8.0, 8)):
        with pytest.raises(ValueError, match="block must be a pair of positive ints"):
            sparsify(model, block=block)


def test_sparsify_torch_pruned_model_and_undividable_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 10))
    mask = block_pruned(torch.ones(64, 30 // 6 * 6), (8, 6), 0.3) != 0
    torch_prune.custom_from_mask(model[0], "weight", mask)
    x = torch.randn(5, 30)
    with torch.no_grad():
        expected = model(x)
    decisions = {d.name: d for d in sparsify(model, block=(8, 6), format="bsr")}
    assert decisions["0"].kind == "bsr" and decisions["2"].kind == "dense"  # 10 rows: no 8x6 blocks
    with torch.no_grad():
        assert_close_to(model(x), expected)
