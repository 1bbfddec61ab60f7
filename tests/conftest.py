"""Fixtures shared by the kernel tests."""

import pytest

from pxkern._extension import EXTENSION_AVAILABLE


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
