"""Which implementation runs an op: the one place that decides.

Backends:

* ``"cpp"``: the compiled extension's CPU kernels (``pxkern._C``), for CPU tensors;
* ``"triton"``: the Triton kernels in :mod:`pxkern.kernels.triton`, for CUDA tensors, or
  for CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run them without a GPU);
* ``"torch"``: plain PyTorch, any device.

By default the choice follows the tensors' device and what is installed. A caller
overrides it with an op's ``backend=`` argument, or for every op at once with the
environment variable ``PXKERN_BACKEND``; an override that cannot run raises instead of
silently running something else.
"""

import importlib.util
import os

import torch

from pxkern._extension import EXTENSION_AVAILABLE

__all__ = ["BACKENDS", "TRITON_AVAILABLE", "choose_backend", "triton_interpreted"]

BACKENDS = ("cpp", "triton", "torch")

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ kernels run on CPU tensors, got {device}"
        if not EXTENSION_AVAILABLE:
            return "the pxkern._C extension is not built (pip install --no-build-isolation -e .)"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA tensors, got {device}"
    return None


def choose_backend(
    op: str,
    device: torch.device,
    backend: str | None = None,
    implemented: tuple[str, ...] = BACKENDS,
) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    Args:
        op: the op's name, for error messages.
        device: the device of the op's tensors.
        backend: ``"cpp"``, ``"triton"``, ``"torch"`` to force one, or None for
            ``PXKERN_BACKEND`` if set, else the fastest available.
        implemented: the backends ``op`` has. ``PXKERN_BACKEND`` naming one it lacks
            is ignored (it is a preference for all ops); ``backend=`` naming one raises.

    Raises:
        ValueError: an unknown backend name, or one ``op`` does not implement.
        RuntimeError: a forced backend that cannot run here, with the reason.
    """
    from_environment = os.environ.get("PXKERN_BACKEND") or None
    if backend is None and from_environment not in implemented:
        if from_environment is not None and from_environment not in BACKENDS:
            raise ValueError(
                f"PXKERN_BACKEND must be one of {BACKENDS}, got {from_environment!r}"
            )
        from_environment = None
    forced = backend if backend is not None else from_environment
    if forced is not None:
        if forced not in implemented:
            raise ValueError(f"{op}: backend must be one of {implemented}, got {forced!r}")
        reason = _why_not(forced, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {forced!r} cannot run: {reason}")
        return forced
    preference = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for candidate in preference:
        if candidate in implemented and _why_not(candidate, device) is None:
            return candidate
    return "torch"
