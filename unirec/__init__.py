"""unirec: a unified Transformer recommender on fused kernels.

The kernels live in the compiled extension ``unirec._C`` (ops under
``torch.ops.unirec``, loaded by :mod:`unirec._ext`); ``unirec.ops`` holds their
Python entry points and ``unirec.nn`` the modules built on them. The layers above
(``data``, ``models``, ``evaluation``, ``runs``, ``training``, ``serving``,
``cli``) are imported on use.
"""
from ._ext import _C
from . import ops  # noqa: E402,F401
from . import nn  # noqa: E402,F401

__version__ = "0.1.0"


def build_info() -> dict:
    """Backends compiled into unirec._C, CUDA architectures, compiler, threads."""
    return _C.build_info()
