#!/usr/bin/env bash
# Compiles and links the CUDA sources (sm_90 by default) against a CUDA build of
# torch on a machine that may have no GPU, then imports the result and checks
# that build_info lists the CUDA backend. Nothing is installed.
#
#   CUDA_PYTHON=/path/to/venv-with-cuda-torch/bin/python bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CUDA_PYTHON:-python}
# Absolute (symlinks kept: a venv's python is one): the import check runs in another folder.
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; *) PY=$(command -v "$PY") ;; esac
OUTDIR=${UNIREC_CUDA_BUILD_DIR:-/tmp/unirec-cuda-build}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
# The CPU machines' CUDA toolkit lacks some library headers (cusparse.h, cublas_v2.h ...);
# the nvidia wheels that come with a CUDA build of torch carry them.
NV_INC=$("$PY" -c 'import glob, os, site; print(":".join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "cu*", "include")))))')
export CPATH=${NV_INC}${CPATH:+:$CPATH}
"$PY" -c 'import torch; assert torch.version.cuda, "CUDA_PYTHON must point at a CUDA build of torch"; print("torch", torch.__version__, "cuda", torch.version.cuda)'
rm -rf "$OUTDIR/pkg"
UNIREC_CUDA=1 "$PY" setup.py -q build_ext -b "$OUTDIR/lib" -t "$OUTDIR/tmp"
mkdir -p "$OUTDIR/pkg"
cp -r unirec "$OUTDIR/pkg/"
cp "$OUTDIR"/lib/unirec/_C*.so "$OUTDIR/pkg/unirec/"
cd "$OUTDIR/pkg"
"$PY" - <<'PY'
import torch, unirec
info = unirec.build_info()
print("build_info:", {k: v for k, v in info.items() if k != "parallel"})
assert "cuda" in info["backends"], info
kernels = torch._C._dispatch_dump("unirec::tbe_forward")
assert "CUDA" in kernels, kernels
print("CUDA build check passed")
PY
