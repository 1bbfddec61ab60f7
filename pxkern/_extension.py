"""Loads the compiled extension ``pxkern._C``; importing it registers the ``pxkern::*`` ops.

If the extension is missing (not built, or built against another torch) the package
still works on the pure PyTorch paths: one warning is issued and ``EXTENSION_AVAILABLE``
is False. ``PXKERN_DISABLE_EXTENSION=1`` forces the pure PyTorch paths without loading it.
"""

import os
import warnings

EXTENSION_AVAILABLE = False

if os.environ.get("PXKERN_DISABLE_EXTENSION", "0") != "1":
    try:
        from pxkern import _C  # noqa: F401  (registers the ops on import)

        EXTENSION_AVAILABLE = True
    except ImportError as error:
        warnings.warn(
            f"pxkern C++ extension could not be loaded ({error}); using the slower pure "
            "PyTorch paths. Build it with `pip install --no-build-isolation -e .` from the "
            "repository root.",
            RuntimeWarning,
            stacklevel=2,
        )
