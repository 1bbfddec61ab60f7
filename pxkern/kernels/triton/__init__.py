"""Triton kernels and their launchers, one module per op stem (``bsr_dense_mm.py``, ...).

Imported only when the Triton backend is chosen (see :mod:`pxkern.backend`), so that
``import pxkern`` does not need Triton and ``TRITON_INTERPRET`` can be set before the
kernels are defined.
"""
