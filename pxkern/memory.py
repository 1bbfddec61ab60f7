"""Reuse of large CPU blocks while pxkern works (``pxkern::reuse_cpu_memory``).

PX scoring and pruning allocate many activation-sized temporaries of the same few sizes,
stream after stream and round after round. Freed blocks of that size go back to the
system and come back as fresh pages, a page fault per 4 KB (on this project's CPU
machine a fresh 8 MB ``torch.sign`` took 3-4x the time of one into reused memory).
Inside :func:`reused_cpu_memory`, tensors of 256 KB or more come from a pool that keeps
freed blocks for the next tensor of the same size; leaving the outermost one gives the
pool back to the system. Tensors made inside may outlive it (their memory is freed as
usual when they die).
"""

import contextlib
from collections.abc import Iterator

import torch

from pxkern._extension import EXTENSION_AVAILABLE

__all__ = ["reused_cpu_memory"]


@contextlib.contextmanager
def reused_cpu_memory() -> Iterator[None]:
    """Pool large CPU allocations for the duration of the block (nests; a no-op without
    the compiled extension)."""
    if not EXTENSION_AVAILABLE:
        yield
        return
    torch.ops.pxkern.reuse_cpu_memory(True)
    try:
        yield
    finally:
        torch.ops.pxkern.reuse_cpu_memory(False)
