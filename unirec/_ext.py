"""The compiled extension ``unirec._C``, loaded once for the package root and the ops.

Importing it registers every ``torch.ops.unirec.*`` op (schemas in csrc/unirec.cpp).
A missing or broken build is a clear error with the command that builds it, never a
silent fall-back to slow code.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "unirec's compiled kernels (unirec._C) could not be loaded: "
        f"{exc}.\nBuild them against the installed torch from the source tree with\n"
        "    pip install --no-build-isolation .\n"
        "(add -e for a development install). See README.md."
    ) from exc

__all__ = ["_C"]
