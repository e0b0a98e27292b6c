"""jagged_attention forward+backward against padded SDPA and the padded masked computation.

CPU shapes (the issue's): B=64, max_seqlen=200, lengths U[20, 200], H=2, Dh=32
(MovieLens) and B=16, max_seqlen=1024, lengths U[256, 1024], H=4, Dh=64, float32.
GPU shape: bf16, B=128, max_seqlen=1024, lengths U[256, 1024], H=4, Dh=64.

Providers: unirec (C++ on CPU, Triton on CUDA), the jagged reference (pads
inside), sdpa_padded (F.scaled_dot_product_attention on pre-padded [B, H, N, Dh]
tensors with the equivalent boolean mask; padding not timed) and, for silu,
padded_masked (the HSTU computation on pre-padded tensors, padding not timed).
flops count only the visible (causal, unpadded) pairs: 4*Dh per pair forward,
3.5x that forward+backward. On CPU, peak_rss_mb is the rise of the process's
resident-set high-water mark during one fwd+bwd call (VmHWM reset through
/proc/self/clear_refs, freed heap trimmed first); on CUDA, peak_mem_mb.
"""
import ctypes
import gc
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import measure

import unirec  # noqa: F401
from unirec.ops import jagged_attention
from unirec.ops.reference.attention import jagged_attention_mask, pad_jagged

CPU_SHAPES = {
    "movielens_B64_N200_H2_D32": (64, 200, 20, 2, 32),
    "long_B16_N1024_H4_D64": (16, 1024, 256, 4, 64),
}
GPU_SHAPES = {
    "B128_N1024_H4_D64": (128, 1024, 256, 4, 64),
}


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def peak_rss_mb(fn):
    """Rise of peak RSS (MiB) over one call of fn, or None where the peak cannot be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _vm("VmRSS")
    fn()
    return round(_vm("VmHWM") - base, 1)


def make_case(shape, device, dtype, seed=0):
    B, N, lo, H, D = shape
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, N + 1, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    T = int(offsets[-1])
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    pairs = H * int((lengths * (lengths + 1) // 2).sum())
    return dict(q=q, k=k, v=v, do=do, offsets=offsets.to(device), N=N, H=H, D=D, pairs=pairs)


def providers(case, activation, device):
    q, k, v, do, off, N = case["q"], case["k"], case["v"], case["do"], case["offsets"], case["N"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def jagged(impl):
        def fn():
            out = jagged_attention(*leaves, off, N, activation=activation, impl=impl)
            return torch.autograd.grad(out, leaves, do)
        return fn

    padded = [pad_jagged(t, off, N).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    dop = pad_jagged(do, off, N).transpose(1, 2).contiguous()
    mask = jagged_attention_mask(off, N, True)[:, None]  # [B, 1, N, N]
    scale = case["D"] ** -0.5

    def sdpa():
        out = F.scaled_dot_product_attention(*padded, attn_mask=mask)
        return torch.autograd.grad(out, padded, dop)

    def padded_masked():
        qp, kp, vp = padded
        s = (qp @ kp.transpose(-1, -2)) * scale
        p = F.silu(s).masked_fill(~mask, 0.0) / N
        return torch.autograd.grad(p @ vp, padded, dop)

    res = {"unirec": jagged("auto")}
    if activation == "softmax":
        res["sdpa_padded"] = sdpa
    else:
        res["padded_masked"] = padded_masked
    res["reference"] = jagged("reference")
    return res


def _cases(device):
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    return [(name, act, prov) for name in shapes for act in ("softmax", "silu")
            for prov in ("unirec", "sdpa_padded" if act == "softmax" else "padded_masked", "reference")]


_CACHE = {}


_DEV = os.environ.get("UNIREC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name,activation,provider", _cases(_DEV), ids=lambda x: str(x))
def test_jagged_attention_fwd_bwd(benchmark, device, name, activation, provider):
    shape = (CPU_SHAPES if device == "cpu" else GPU_SHAPES)[name]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    key = (name, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_case(shape, device, dtype)
    case = _CACHE[key]
    fn = providers(case, activation, device)[provider]
    info = {}
    if device == "cpu":
        fn()  # warm-up before the memory reading
        info["peak_rss_mb"] = peak_rss_mb(fn)
    flops = 3.5 * 4 * case["D"] * case["pairs"]
    measure(benchmark, fn, device=device, group=f"attention-{activation}-{name}-fwd+bwd", provider=provider,
            flops=flops, rounds=None if device == "cuda" else 5, visible_pairs=case["pairs"], **info)
