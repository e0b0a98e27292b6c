"""jagged_attention forward+backward against stock PyTorch: padded SDPA, torch's nested jagged SDPA.

CPU shapes (the issue's): B=64, max_seqlen=200, lengths U[20, 200], H=2, Dh=32
(MovieLens) and B=16, max_seqlen=1024, lengths U[256, 1024], H=4, Dh=64, float32.
GPU shape: bf16, B=128, max_seqlen=1024, lengths U[256, 1024], H=4, Dh=64.
Variants: causal softmax, causal HSTU silu, and (MovieLens shape) causal softmax
with TARGETS candidates at the end of each sequence.

Providers: unirec (C++ on CPU, Triton on CUDA), the jagged reference (pads
inside), sdpa_padded (F.scaled_dot_product_attention on pre-padded [B, H, N, Dh]
tensors, padding not timed, with is_causal=True: padded keys lie after every
real query, so no mask is needed; a boolean mask only for targets),
sdpa_nested_jagged (torch.nested with layout=torch.jagged into the same SDPA,
no padding at all) and, for silu, padded_masked (the HSTU computation on
pre-padded tensors, padding not timed). A stock provider that torch cannot run
for a variant is skipped as "unsupported by torch: ..." with torch's reason and
recorded so (torch 2.13's nested SDPA takes neither is_causal=True nor a mask;
SDPA has no SiLU).
flops count only the visible (causal, unpadded) pairs: 4*Dh per pair forward,
3.5x that forward+backward. On CPU, peak_rss_mb is the rise of the process's
resident-set high-water mark during one fwd+bwd call (VmHWM reset through
/proc/self/clear_refs, freed heap trimmed first); on CUDA, peak_mem_mb.
"""
import ctypes
import gc
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import measure, unsupported

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


TARGETS = 16


def make_case(shape, device, dtype, seed=0):
    B, N, lo, H, D = shape
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, N + 1, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    T = int(offsets[-1])
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return dict(q=q, k=k, v=v, do=do, offsets=offsets.to(device), lengths=lengths, N=N, H=H, D=D)


def visible_pairs(case, targets):
    """(query, key) pairs a token attends to, over heads: causal history, and each target the
    history and itself."""
    n = case["lengths"]
    if not targets:
        return case["H"] * int((n * (n + 1) // 2).sum())
    hist = n - targets
    return case["H"] * int((hist * (hist + 1) // 2 + targets * (hist + 1)).sum())


def providers(case, variant, device):
    q, k, v, do, off, N = case["q"], case["k"], case["v"], case["do"], case["offsets"], case["N"]
    activation = "silu" if variant == "silu" else "softmax"
    targets = TARGETS if variant == "softmax+targets" else 0
    num_targets = torch.full((off.numel() - 1,), targets, device=off.device) if targets else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def jagged(impl):
        def fn():
            out = jagged_attention(*leaves, off, N, activation=activation, num_targets=num_targets, impl=impl)
            return torch.autograd.grad(out, leaves, do)
        return fn

    padded = [pad_jagged(t, off, N).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    dop = pad_jagged(do, off, N).transpose(1, 2).contiguous()  # zero on padded rows: they add no gradient
    mask = jagged_attention_mask(off, N, True, num_targets)[:, None]  # [B, 1, N, N]
    scale = case["D"] ** -0.5

    def sdpa_padded():
        if targets:
            out = F.scaled_dot_product_attention(*padded, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(*padded, is_causal=True)
        return torch.autograd.grad(out, padded, dop)

    def sdpa_nested_jagged():
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, off).transpose(1, 2) for t in leaves)
        if targets:  # a jagged query/key mask has no nested form: the padded dense one is all there is
            out = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(qn, kn, vn, is_causal=True)
        return torch.autograd.grad(out.transpose(1, 2).values(), leaves, do)

    def padded_masked():
        qp, kp, vp = padded
        s = (qp @ kp.transpose(-1, -2)) * scale
        p = F.silu(s).masked_fill(~mask, 0.0) / N
        return torch.autograd.grad(p @ vp, padded, dop)

    res = {"unirec": jagged("auto"), "reference": jagged("reference")}
    if activation == "softmax":
        res.update(sdpa_padded=sdpa_padded, sdpa_nested_jagged=sdpa_nested_jagged)
    else:
        res["padded_masked"] = padded_masked
    return res


_NO_SILU = (f"unsupported by torch {torch.__version__}: scaled_dot_product_attention computes softmax attention "
            "only, no pointwise SiLU")
STOCK = {"softmax": ["sdpa_padded", "sdpa_nested_jagged"], "softmax+targets": ["sdpa_padded", "sdpa_nested_jagged"],
         "silu": ["padded_masked", "sdpa_padded", "sdpa_nested_jagged"]}


def _cases(device):
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    first = next(iter(shapes))
    return [(name, var, prov) for name in shapes for var in ("softmax", "silu", "softmax+targets")
            if var != "softmax+targets" or name == first
            for prov in ["unirec", *STOCK[var], "reference"]]


class _TorchLog(logging.Handler):
    """Collects what torch's nested SDPA logs when it finds no backend: its exception only says
    "No viable backend", the log says why (e.g. no nested query/key with is_causal=True)."""

    LOGGER = "torch.nested._internal.sdpa"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage().strip())

    def __enter__(self):
        logging.getLogger(self.LOGGER).addHandler(self)

    def __exit__(self, *exc):
        logging.getLogger(self.LOGGER).removeHandler(self)

    def reasons(self):
        # The headers ("... kernel not used because:") carry no reason; the lines after them do.
        return list(dict.fromkeys(x for x in self.lines if x and not x.endswith("because:")))


_CACHE = {}


_DEV = os.environ.get("UNIREC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name,variant,provider", _cases(_DEV), ids=lambda x: str(x))
def test_jagged_attention_fwd_bwd(benchmark, device, name, variant, provider):
    shape = (CPU_SHAPES if device == "cpu" else GPU_SHAPES)[name]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    group = f"attention-{variant}-{name}-fwd+bwd"
    B, N, lo, H, D = shape
    params = dict(B=B, max_seqlen=N, min_len=lo, H=H, Dh=D, dtype=str(dtype).removeprefix("torch."),
                  targets=TARGETS if variant == "softmax+targets" else 0)
    key = (name, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_case(shape, device, dtype)
    case = _CACHE[key]
    fns = providers(case, variant, device)
    if provider not in fns:
        unsupported(benchmark, device=device, group=group, provider=provider, reason=_NO_SILU, params=params)
    fn = fns[provider]
    log = _TorchLog()
    try:
        with log:
            fn()  # warm-up; and torch's verdict on the stock providers
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        if provider == "unirec" or provider == "reference":
            raise
        what = "a target mask" if params["targets"] else "is_causal=True"
        why = "; ".join([f"{type(exc).__name__}: {str(exc).splitlines()[0]}"] + log.reasons())
        reason = f"unsupported by torch {torch.__version__}: {provider} with {what} ({why})"
        unsupported(benchmark, device=device, group=group, provider=provider, reason=reason, params=params)
    info = {}
    if device == "cpu":
        info["peak_rss_mb"] = peak_rss_mb(fn)
    pairs = visible_pairs(case, params["targets"])
    flops = 3.5 * 4 * D * pairs
    measure(benchmark, fn, device=device, group=group, provider=provider, flops=flops,
            rounds=None if device == "cuda" else 5, params=params, visible_pairs=pairs, **info)
