"""Individual kernels, one module per op; each falls back to plain PyTorch without the
compiled extension."""
