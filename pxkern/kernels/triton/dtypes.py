"""The dtypes Triton kernels compute in, shared by every kernel module."""

import torch
import triton.language as tl

from pxkern.backend import triton_interpreted

__all__ = ["accumulator_dtype", "dot_operand_dtype"]

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype sums are kept in: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_operand_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype ``tl.dot`` operands are cast to: the input dtype, except bfloat16 under
    the interpreter (triton 3.9), which holds bfloat16 values as raw 16-bit integers and
    so multiplies them wrongly; there they are widened to float32."""
    if dtype == torch.bfloat16 and triton_interpreted():
        return tl.float32
    return _TRITON_DTYPES[dtype]
