"""Compile every Triton kernel configuration the GPU path can select, ahead of time, for sm_90.

Needs no GPU: triton.compile with an explicit GPUTarget runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) on the CPU, real bfloat16
tl.dot included. The configurations come from the selection code the launchers
call at run time (attention: DTYPES, MAX_HEAD_DIM, constexprs, gpu_blocks,
F32_PRECISIONS; loss: DTYPES, MAX_D, gpu_config, precision, int_class): every
accepted head dim / row width, dtype, precision, activation and bias switch is
walked, and the distinct compiled kernels are kept. causal and num_targets are
run-time arguments of the same kernels. Integer arguments are specialised as
Triton does (a value of 1 is a constant, a multiple of 16 is marked so);
pointers are 16-byte aligned, which the launchers ensure.

A compile error, or shared memory above the target's per-block limit (Triton
only finds that out when a GPU loads the kernel), fails the run: exit status 1.
One line per kernel: configurations, time, the largest shared memory and
register count (from ptxas), and how many spill registers.

    python scripts/compile_triton.py [--arch 90] [--jobs 2] [-k SUBSTRING] [-v]
"""
import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

# The interpreter replaces @triton.jit at import time: it must be off before triton is imported. A fresh cache
# makes every kernel go through ptxas, whose log gives registers and spills.
os.environ.pop("TRITON_INTERPRET", None)
CACHE = tempfile.mkdtemp(prefix="unirec-triton-aot-")
os.environ["TRITON_CACHE_DIR"] = CACHE
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default at run time, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from unirec.ops.triton import attention as att  # noqa: E402
from unirec.ops.triton import loss  # noqa: E402

# Shared memory per block (opt-in maximum) by compute capability.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}

KERNELS = {
    "attention.fwd": (att, "_jagged_attention_fwd_kernel"),
    "attention.dkdv": (att, "_jagged_attention_bwd_dkdv_kernel"),
    "attention.dq": (att, "_jagged_attention_bwd_dq_kernel"),
    "loss.fwd": (loss, "_softmax_ce_fwd_kernel"),
    "loss.bwd_dh": (loss, "_softmax_ce_bwd_dh_kernel"),
    "loss.bwd_de": (loss, "_softmax_ce_bwd_de_kernel"),
}


def _attention_types(dtype):
    t = f"*{TYPE[dtype]}"
    types = dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "RelBias"], t)
    types.update(dict.fromkeys(["LSE", "Delta", "DRB"], "*fp32"))
    types.update(Offsets="*i64", NumTargets="*i64", scale="fp32", inv_n="fp32")
    types.update(dict.fromkeys(["H", "max_seqlen", "causal", "has_targets"], "i32"))
    return types


def _loss_types(dtype):
    t = f"*{TYPE[dtype]}"
    # ditems / dbias are stored in the inputs' dtype on the GPU
    types = dict.fromkeys(["H", "E", "BIAS", "DE", "DB"], t)
    types.update(dict.fromkeys(["PMAX", "PSUM", "PZT", "PZS", "G", "LSE", "DH"], "*fp32"))
    types.update(T="*i64", eps="fp32")
    types.update(dict.fromkeys(["M", "N", "D", "stride_h", "stride_e", "span", "ignore_index", "has_bias"], "i32"))
    return types


def _add(found, kernel, dtype, meta, options, int_class, size):
    key = (kernel, TYPE[dtype], tuple(sorted(meta.items())), tuple(sorted(options.items())), int_class)
    found.setdefault(key, []).append(size)


def configs():
    """{(kernel, dtype, constexprs, options, integer class): [the sizes that select it]}."""
    found = {}
    for dtype in att.DTYPES:
        precisions = att.F32_PRECISIONS if dtype == torch.float32 else [att.precision(dtype)]
        for prec in precisions:
            for D in range(1, att.MAX_HEAD_DIM + 1):
                for activation in att.ACTIVATIONS:
                    for bias in (False, True):
                        meta = att.constexprs(D, dtype, activation, bias, prec, interpreting=False)
                        for kernel in att.KERNELS:
                            bm, bn, warps, stages = att.gpu_blocks(kernel, meta["BLOCK_D"], dtype)
                            _add(found, f"attention.{kernel}", dtype, dict(meta, BLOCK_M=bm, BLOCK_N=bn),
                                 dict(num_warps=warps, num_stages=stages), "", D)
    for dtype in loss.DTYPES:
        prec = loss.precision(dtype, interpreting=False)
        for D in range(1, loss.MAX_D[dtype] + 1):
            bm, bn, bd, warps = loss.gpu_config(D)
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec)
            for kernel in loss.KERNELS:
                # D and both row strides share D's class (the launcher copies views that do not)
                _add(found, f"loss.{kernel}", dtype, meta, dict(num_warps=warps), loss.int_class(D), D)
    return found


def _describe(key, sizes):
    kernel, dtype, meta, options, int_class = key
    m = dict(meta)
    flags = " ".join(f"{k}={v}" for k, v in meta if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    opts = " ".join(f"{k[4:] if k.startswith('num_') else k}={v}" for k, v in options)
    span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}..{sizes[-1]}"
    size = "Dh" if kernel.startswith("attention") else "D"
    tiles = "x".join(str(m[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if b in m)
    cls = {"1": " (constant 1)", "16": " (multiple of 16)", "": ""}[int_class] if kernel.startswith("loss") else ""
    return f"{kernel} {dtype} {size} {span}{cls} {tiles} {opts} {flags}"


def _compile(job):
    key, arch = job
    kernel, dtype_name, meta, options, int_class = key
    module, fn_name = KERNELS[kernel]
    fn = getattr(module, fn_name)
    dtype = {v: k for k, v in TYPE.items()}[dtype_name]
    types = (_attention_types if module is att else _loss_types)(dtype)
    constants = dict(meta)
    ints = ["D", "stride_h", "stride_e"] if module is loss else []
    if int_class == "1":
        constants.update(dict.fromkeys(ints, 1))
    signature = {a: "constexpr" if a in constants else types[a] for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if signature[a].startswith("*") or (int_class == "16" and a in ints)]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    with contextlib.suppress(AttributeError):
        triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                               options=dict(options))
    except Exception as e:  # noqa: BLE001 - reported per configuration
        msg = " ".join(str(e).split())[:400]
        return key, f"compile error: {type(e).__name__}: {msg}", 0, None, None, time.perf_counter() - t0
    secs = time.perf_counter() - t0
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    smem = k.metadata.shared
    limit = SMEM_LIMIT.get(arch, 227 * 1024)
    err = f"shared memory {smem} B above the sm_{arch} limit of {limit} B" if smem > limit else None
    return (key, err, smem, int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None, secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90 (H100/H200)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("-k", default="", help="only configurations whose description contains this")
    ap.add_argument("-v", action="store_true", help="one line per configuration")
    args = ap.parse_args()
    found = configs()
    jobs = [(key, args.arch) for key, sizes in found.items() if args.k in _describe(key, sizes)]
    print(f"triton {triton.__version__}, target sm_{args.arch}: {len(jobs)} kernel configurations, "
          f"{args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    per_kernel = defaultdict(lambda: dict(n=0, failed=0, secs=0.0, smem=0, regs=0, spilled=0))
    try:
        with ProcessPoolExecutor(args.jobs) as pool:
            for key, err, smem, regs, spills, secs in pool.map(_compile, jobs, chunksize=4):
                s = per_kernel[key[0]]
                s["n"] += 1
                s["secs"] += secs
                s["failed"] += err is not None
                s["smem"] = max(s["smem"], smem)
                s["regs"] = max(s["regs"], regs or 0)
                s["spilled"] += bool(spills)
                if err or args.v:
                    print(f"{'FAIL' if err else 'ok  '} {_describe(key, found[key])}: "
                          f"{err or f'smem {smem} B, {regs} registers, {spills} B spilled'}", flush=True)
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)
    failed = 0
    for kernel in KERNELS:
        if kernel in per_kernel:
            s = per_kernel[kernel]
            failed += s["failed"]
            print(f"{kernel:<16} {s['n'] - s['failed']:>3}/{s['n']:<3} compiled  {s['secs']:6.1f} s  "
                  f"max smem {s['smem'] / 1024:5.1f} KB  max regs {s['regs']:>3}  spilling {s['spilled']}"
                  + (f"  {s['failed']} FAILED" if s["failed"] else ""))
    print(f"{len(jobs) - failed}/{len(jobs)} configurations compiled for sm_{args.arch}, {failed} failed, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if failed or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
