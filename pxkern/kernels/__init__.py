"""Kernels below the ops (:mod:`pxkern.ops`): one file per op stem and backend."""
