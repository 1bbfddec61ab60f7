"""pxkern.ops.measured_choice: the faster of two implementations, timed once per key and
level, with levels implied by others where the timing rule allows.

The clock is replaced by stated times (no timing in tests): what is checked is which one
is chosen, what runs when a key or level is new, and that a known one runs nothing.
"""

import pytest

import pxkern.ops.measured_choice as measured_choice
from pxkern.ops.measured_choice import second_is_faster


@pytest.fixture
def clock(monkeypatch):
    """Fresh choices; ``_best_of_two`` returns the stated seconds of the name its run returns."""
    seconds = {}
    monkeypatch.setattr(measured_choice, "_CHOICES", {})
    monkeypatch.setattr(measured_choice, "_best_of_two", lambda run: seconds[run()])
    return seconds


def recorded(ran, name):
    return lambda: ran.append(name) or name


def test_the_faster_wins_and_each_key_is_timed_once(clock):
    clock.update({"dense": 2.0, "sparse": 1.0, "other": 3.0})
    ran = []
    assert second_is_faster(("conv", 1), recorded(ran, "dense"), recorded(ran, "sparse"))
    assert sorted(ran) == ["dense", "sparse"]
    assert second_is_faster(("conv", 1), recorded(ran, "dense"), recorded(ran, "sparse"))
    assert len(ran) == 2, "a known key is not timed again"
    assert not second_is_faster(("conv", 2), recorded(ran, "dense"), recorded(ran, "other"))
    assert len(ran) == 4, "a new key is timed"


def test_levels_imply_each_other(clock):
    ran = []
    key = ("conv", "shape")
    clock.update({"dense": 2.0, "sparse at 5": 3.0, "sparse at 2": 1.0, "sparse at 3": 2.5})
    assert not second_is_faster(key, recorded(ran, "dense"), recorded(ran, "sparse at 5"), level=5)
    assert sorted(ran) == ["dense", "sparse at 5"]
    assert not second_is_faster(key, recorded(ran, "dense"), recorded(ran, "never"), level=7)
    assert len(ran) == 2, "above a level where the second lost it loses, untimed"
    assert second_is_faster(key, recorded(ran, "dense"), recorded(ran, "sparse at 2"), level=2)
    assert sorted(ran[2:]) == ["dense", "sparse at 2"], "both are timed at a new level, together"
    assert second_is_faster(key, recorded(ran, "dense"), recorded(ran, "never"), level=0)
    assert len(ran) == 4, "below a level where the second won it wins, untimed"
    assert not second_is_faster(key, recorded(ran, "dense"), recorded(ran, "sparse at 3"), level=3)
    assert sorted(ran[4:]) == ["dense", "sparse at 3"], "between a win and a loss: timed"
    assert second_is_faster(key, recorded(ran, "dense"), recorded(ran, "never"), level=2)
    assert len(ran) == 6, "a known level is looked up"


def test_best_of_two_runs_twice_and_returns_a_time():
    calls = []
    elapsed = measured_choice._best_of_two(lambda: calls.append(1))
    assert calls == [1, 1] and elapsed >= 0.0
