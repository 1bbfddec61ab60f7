"""Autotuning configs for the Triton kernels: a list to time on a GPU, one config under
the interpreter.

``triton.autotune`` times every config on the first launch for each new key. Under
``TRITON_INTERPRET=1`` (the CPU tests) that timing means nothing and every launch is
slow, so a kernel passes both lists through :func:`autotune_configs` and gets a single
config there; a kernel should pick that config so the tests still run its tiling paths
(partial tiles, tiles smaller than a block).

Usage::

    @triton.autotune(configs=autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIG), key=[...])
    @triton.jit
    def _kernel(...): ...

The choice is made when the kernel module is imported, which is also when Triton reads
``TRITON_INTERPRET``.
"""

from collections.abc import Sequence

import triton

from pxkern.backend import triton_interpreted

__all__ = ["autotune_configs"]


def autotune_configs(
    gpu: Sequence[triton.Config], interpreted: triton.Config
) -> list[triton.Config]:
    """``[interpreted]`` under the Triton interpreter, else ``gpu``."""
    return [interpreted] if triton_interpreted() else list(gpu)
