"""Builds the extension unirec._C against the installed torch.

The CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. The CUDA
sources (csrc/cuda/*.cu) are compiled when torch is a CUDA build and nvcc is
found -- a build machine needs no GPU. UNIREC_CUDA=0|1 overrides the choice.

Every file gets the same flags: kernels built for AVX2 or AVX-512 choose their
ISA with `#pragma GCC target` in their own file (csrc/cpu/embedding_pool_*.cpp),
so this file and CMakeLists.txt need no per-file flags to stay in step. Those
kernel files are small and separate so that ninja compiles them in parallel.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "unirec compiles its kernels against the installed PyTorch, which was not found.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install torch ninja numpy pybind11 setuptools wheel\n"
        "    pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    # Paths relative to setup.py: setuptools refuses absolute source paths.
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda():
    flag = os.environ.get("UNIREC_CUDA", "").strip()
    nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if flag == "1":
        if torch.version.cuda is None or not nvcc:
            sys.exit("UNIREC_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME).")
        return True
    if flag == "0":
        return False
    return torch.version.cuda is not None and nvcc


cuda = want_cuda()
cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu") if cuda else []
include_dirs = [os.path.join(HERE, "csrc", "include")]
cxx_flags = ["-O3", "-fopenmp"]
if os.environ.get("UNIREC_NATIVE", "0") == "1":
    cxx_flags.append("-march=native")
define_macros = []
if cuda:
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    archs = sorted({f.split("code=")[-1].strip("[]") for f in _get_cuda_arch_flags() if "code=" in f})
    define_macros += [("UNIREC_WITH_CUDA", None), ("UNIREC_CUDA_ARCHS", '"%s"' % ",".join(archs))]
    ext = CUDAExtension(
        "unirec._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "unirec._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
