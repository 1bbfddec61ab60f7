"""The peak measurements of pxkern.px.scaled, against ``t.abs().max()`` in float64."""

import math

import pytest
import torch

from pxkern.px.scaled import largest_magnitude, largest_nonnegative, magnitude_exponent


def _tensors(kind: str, poison: float | None = None) -> list[torch.Tensor]:
    """Tensors of one layout; ``poison`` replaces the first element of the first base
    tensor before it is given its layout (an expansion then repeats it)."""
    g = torch.Generator().manual_seed(0)

    def base(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g) * scale
        if poison is not None and not made:
            t.view(-1)[0] = poison
        made.append(t)
        return t

    made: list[torch.Tensor] = []
    if kind == "contiguous":
        return [base(3, 5), base(7, scale=40.0)]
    if kind == "channels_last":
        return [base(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)]
    if kind == "expanded":  # stride-0 dimensions, as the all-ones streams make them
        return [base(1, 3, 1, 1).expand(4, 3, 5, 5), base(()).expand(2, 2)]
    if kind == "zero_dim":
        return [base(()), base((), scale=3.0).double()]
    if kind == "strided":
        return [base(6, 8)[::2, :2]]
    if kind == "mixed_with_empty":
        return [torch.empty(0), base(4, 4).t(), base(())]
    raise ValueError(kind)


KINDS = ["contiguous", "channels_last", "expanded", "zero_dim", "strided", "mixed_with_empty"]


@pytest.mark.parametrize("kind", KINDS)
def test_largest_magnitude_matches_abs_max(kind):
    tensors = _tensors(kind)
    expected = max(float(t.double().abs().max()) for t in tensors if t.numel())
    assert largest_magnitude(tensors) == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_largest_magnitude_reports_non_finite_values(kind, bad):
    peak = largest_magnitude(_tensors(kind, poison=bad))
    assert math.isnan(peak) if math.isnan(bad) else peak == math.inf


def test_largest_magnitude_of_nothing_is_zero():
    assert largest_magnitude([]) == 0.0
    assert largest_magnitude([torch.empty(0, 3)]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_largest_nonnegative_matches_max(kind):
    tensors = [t.abs() for t in _tensors(kind)]
    expected = max(float(t.double().max()) for t in tensors if t.numel())
    assert largest_nonnegative(tensors) == expected


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_largest_nonnegative_reports_non_finite_values(bad):
    tensors = [torch.rand(5, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64)]
    tensors[1][1, 2] = bad
    peak = largest_nonnegative(tensors)
    assert math.isnan(peak) if math.isnan(bad) else peak == math.inf


def test_largest_nonnegative_of_nothing_is_zero():
    assert largest_nonnegative([]) == 0.0
    assert largest_nonnegative([torch.empty(0, 3)]) == 0.0


@pytest.mark.parametrize("value, exponent", [(1.0, 1), (0.75, 0), (-3.0, 2), (2.0 ** -30, -29)])
@pytest.mark.parametrize("zero_dim", [True, False])
def test_magnitude_exponent(value, exponent, zero_dim):
    tensor = torch.tensor(value) if zero_dim else torch.tensor([0.1 * value, value, 0.0])
    assert magnitude_exponent(tensor) == exponent
    assert 2.0 ** (exponent - 1) <= abs(value) < 2.0 ** exponent


def test_magnitude_exponent_of_zeros_is_none_and_of_nan_raises():
    assert magnitude_exponent(torch.zeros(3)) is None
    with pytest.raises(FloatingPointError, match="not finite"):
        magnitude_exponent(torch.tensor(math.nan))
