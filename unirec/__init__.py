"""unirec: a unified Transformer recommender on fused kernels.

The kernels live in the compiled extension ``unirec._C`` (ops under
``torch.ops.unirec``); ``unirec.ops`` holds their Python entry points.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.unirec.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "unirec's compiled kernels (unirec._C) could not be loaded: "
        f"{exc}.\nBuild them against the installed torch from the source tree with\n"
        "    pip install --no-build-isolation .\n"
        "(add -e for a development install). See README.md."
    ) from exc

from . import ops  # noqa: E402,F401
from . import nn  # noqa: E402,F401

__version__ = "0.1.0"


def build_info() -> dict:
    """Backends compiled into unirec._C, CUDA architectures, compiler, threads."""
    return _C.build_info()
