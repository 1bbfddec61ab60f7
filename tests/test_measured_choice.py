"""pxkern.ops.measured_choice: the faster of two implementations, timed once per key.

The clock is replaced by stated times (no timing in tests): what is checked is which one
is chosen, that both run when a key is new, and that a known key runs nothing.
"""

import pxkern.ops.measured_choice as measured_choice
from pxkern.ops.measured_choice import second_is_faster


def test_the_faster_wins_and_each_key_is_timed_once(monkeypatch):
    seconds = {"dense": 2.0, "sparse": 1.0, "other": 3.0}
    ran = []
    monkeypatch.setattr(measured_choice, "_CHOICES", {})
    monkeypatch.setattr(measured_choice, "_best_of_two", lambda run: seconds[run()])

    def timed(name):
        return lambda: ran.append(name) or name

    assert second_is_faster(("conv", 1), timed("dense"), timed("sparse"))
    assert sorted(ran) == ["dense", "sparse"]
    assert second_is_faster(("conv", 1), timed("dense"), timed("sparse"))
    assert len(ran) == 2, "a known key is not timed again"
    assert not second_is_faster(("conv", 2), timed("dense"), timed("other"))
    assert len(ran) == 4, "a new key is timed"


def test_best_of_two_runs_twice_and_returns_a_time():
    calls = []
    elapsed = measured_choice._best_of_two(lambda: calls.append(1))
    assert calls == [1, 1] and elapsed >= 0.0
