"""The one backend choice (pxkern.backend.choose_backend): defaults, overrides, errors."""

import pytest
import torch

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.backend import TRITON_AVAILABLE, choose_backend

CPU = torch.device("cpu")


def test_cpu_default_is_the_cpp_kernels_when_built(monkeypatch):
    monkeypatch.delenv("PXKERN_BACKEND", raising=False)
    assert choose_backend("op", CPU) == ("cpp" if EXTENSION_AVAILABLE else "torch")
    assert choose_backend("op", CPU, implemented=("triton", "torch")) == "torch"


def test_argument_beats_environment_and_environment_beats_default(monkeypatch):
    monkeypatch.setenv("PXKERN_BACKEND", "torch")
    assert choose_backend("op", CPU) == "torch"
    if EXTENSION_AVAILABLE:
        assert choose_backend("op", CPU, backend="cpp") == "cpp"


def test_environment_naming_a_backend_the_op_lacks_is_ignored(monkeypatch):
    monkeypatch.setenv("PXKERN_BACKEND", "cpp")
    assert choose_backend("op", CPU, implemented=("triton", "torch")) == "torch"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"backend": "cuda"}, ValueError, r"op: backend must be one of .* got 'cuda'"),
        ({"backend": "cpp", "implemented": ("triton", "torch")}, ValueError, "backend must be one of"),
    ],
)
def test_unknown_or_unimplemented_backends_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        choose_backend("op", CPU, **kwargs)


def test_unknown_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv("PXKERN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PXKERN_BACKEND must be one of"):
        choose_backend("op", CPU)


def test_forced_backends_that_cannot_run_say_why(monkeypatch):
    if TRITON_AVAILABLE:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
            choose_backend("op", CPU, backend="triton")
    with pytest.raises(RuntimeError, match="run on CPU tensors, got meta"):
        choose_backend("op", torch.device("meta"), backend="cpp")
