"""Fixtures shared by the kernel tests."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The
# variable is read when a kernel is defined, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pxkern._extension import EXTENSION_AVAILABLE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked ``gpu`` on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["auto", "portable"])
def isa(request, monkeypatch):
    """Runs a test on the best ISA of this CPU and on the forced portable path."""
    if request.param == "portable":
        if not EXTENSION_AVAILABLE:
            pytest.skip("ISA selection needs the pxkern._C extension")
        monkeypatch.setenv("PXKERN_CPU_ISA", "portable")
    else:
        monkeypatch.delenv("PXKERN_CPU_ISA", raising=False)
    return request.param
