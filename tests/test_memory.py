"""pxkern.memory.reused_cpu_memory: the pool of large CPU blocks (pxkern::reuse_cpu_memory)."""

import pytest
import torch

from pxkern._extension import EXTENSION_AVAILABLE
from pxkern.memory import reused_cpu_memory

pytestmark = pytest.mark.skipif(not EXTENSION_AVAILABLE, reason="needs the compiled extension")

LARGE = (512, 1024)  # 2 MB of float32: pooled
SMALL = (16, 16)  # 1 KB: not pooled


def _reallocated_pointer(shape) -> tuple[int, int]:
    """data_ptr of a tensor, and of the next one of the same size after it died."""
    first = torch.empty(shape)
    pointer = first.data_ptr()
    del first
    return pointer, torch.empty(shape).data_ptr()


def test_freed_large_block_is_reused_inside_the_scope():
    with reused_cpu_memory():
        before, after = _reallocated_pointer(LARGE)
        assert before == after
        # A slightly smaller tensor rounds up to the same pages and takes the same block.
        block = torch.empty(LARGE)
        pointer = block.data_ptr()
        del block
        assert torch.empty(LARGE[0] * LARGE[1] - 3).data_ptr() == pointer


def test_tensors_made_inside_outlive_the_scope():
    with reused_cpu_memory():
        kept = torch.arange(LARGE[0] * LARGE[1], dtype=torch.float32).reshape(LARGE)
        small = torch.full(SMALL, 7.0)
    expected = torch.arange(LARGE[0] * LARGE[1], dtype=torch.float32).reshape(LARGE)
    assert torch.equal(kept, expected) and torch.equal(small, torch.full(SMALL, 7.0))
    kept.add_(1)  # still writable after the allocator is gone
    assert torch.equal(kept, expected + 1)


def test_scopes_nest_and_the_inner_exit_keeps_the_pool():
    with reused_cpu_memory():
        with reused_cpu_memory():
            block = torch.empty(LARGE)
        pointer = block.data_ptr()
        del block
        assert torch.empty(LARGE).data_ptr() == pointer


def test_exit_after_an_error_restores_the_allocator():
    with pytest.raises(ValueError, match="inside"):
        with reused_cpu_memory():
            raise ValueError("inside")
    with pytest.raises(RuntimeError, match="without a matching"):
        torch.ops.pxkern.reuse_cpu_memory(False)


def test_results_do_not_depend_on_the_pool():
    x = torch.randn(64, 32, 16, 16)
    weight = torch.randn(32, 32, 3, 3)
    expected = torch.nn.functional.conv2d(x, weight, padding=1).relu().sum(0)
    with reused_cpu_memory():
        for _ in range(3):  # later iterations run in reused blocks
            got = torch.nn.functional.conv2d(x, weight, padding=1).relu().sum(0)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
