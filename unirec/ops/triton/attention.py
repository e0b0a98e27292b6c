"""Triton kernels of jagged attention (flash-attention-2 style over packed sequences).

One program per (block of max_seqlen, b, h) on a 1-D grid (``grid``; CUDA
limits grid axes 1 and 2 to 65535, axis 0 to 2^31 - 1): query blocks for the
forward and the dq kernel, key blocks for the dk/dv kernel. A program whose
block starts past its sequence's end exits at once. Token i of a sequence of
length L with t0 = L - num_targets sees key j when

    j < t0 and (j <= i or not causal or i >= t0)     (non-target keys)
    or j == i and i >= t0                            (a target sees itself)

so with ``causal`` the key loop of a query block stops at the block's last
row, and the query loop of a key block starts at the key block's first row.
The forward and dq kernels first run over the key blocks that every row of
the query block sees entirely (no mask arithmetic), then over the rest with
the mask.
Softmax is computed in base 2 with the scale folded in; the forward saves the
natural log-sum-exp per (token, head) for the backward, which recomputes the
probabilities. Scores, softmax and accumulators are float32; tl.dot takes the
inputs' dtype (bfloat16) or float32 with ``input_precision`` ("ieee" for
exact float32, "tf32" for speed).
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter (triton 3.9) miscomputes 16-bit dots: it gets float32 copies of the same values.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _program(max_seqlen, H, BLOCK: tl.constexpr):
    """(block of the sequence, b, h) of this program of the 1-D grid made by ``grid``.

    The blocks of one (b, h) are adjacent, so programs running together share its keys in L2.
    """
    nblocks = tl.cdiv(max_seqlen, BLOCK)
    pid = tl.program_id(0)
    bh = pid // nblocks
    return pid % nblocks, bh // H, bh % H


# Integer arguments are not specialised: no recompilation per batch shape, and the kernels a GPU can need are
# exactly the constexpr combinations (scripts/compile_triton.py compiles them all).
_RUNTIME = ["H", "max_seqlen", "causal", "has_targets"]


@triton.jit
def _head(start, h, H, offs_d, BLOCK_D: tl.constexpr):
    """(row stride, lane mask, offset of the sequence's first row) for head h of a sequence starting at start.

    The launcher pads the head dim to BLOCK_D, so rows are aligned and every lane is real.
    """
    stride_t = H * BLOCK_D
    return stride_t, offs_d[None, :] < BLOCK_D, start.to(tl.int64) * stride_t + h * BLOCK_D


@triton.jit
def _visible(offs_m, offs_n, L, t0, causal):
    i = offs_m[:, None]
    j = offs_n[None, :]
    vis = (j < t0) & ((j <= i) | (i >= t0) | ((j * 0 + causal) == 0))
    vis = vis | ((i == j) & (i >= t0))
    return vis & (i < L) & (j < L)


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, RelBias, base, stride_t, offs_m, offs_n, offs_d, dmask, L, t0, causal, h,
               max_seqlen, scale, qk_scale, inv_n, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the forward; MASKED=False for blocks every row sees entirely (keys < t0, causal-safe)."""
    if MASKED:
        kmask = (offs_n[:, None] < L) & dmask
        vis = _visible(offs_m, offs_n, L, t0, causal)
        bmask = vis
    else:
        kmask = (offs_n[:, None] >= 0) & dmask
        bmask = (offs_m[:, None] < L) & (offs_n[None, :] >= 0)
    k = tl.load(K + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST)
    if SILU:
        s = s * scale
        if HAS_BIAS:
            rel = tl.abs(offs_m[:, None] - offs_n[None, :])
            s += tl.load(RelBias + h * max_seqlen + rel, mask=bmask, other=0.0).to(tl.float32)
        p = s * tl.sigmoid(s) * inv_n
        if MASKED:
            p = tl.where(vis, p, 0.0)
        acc += _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    else:
        s = s * qk_scale
        if HAS_BIAS:
            rel = tl.abs(offs_m[:, None] - offs_n[None, :])
            s += tl.load(RelBias + h * max_seqlen + rel, mask=bmask, other=0.0).to(tl.float32) * 1.4426950408889634
        if MASKED:
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_RUNTIME)
def _jagged_attention_fwd_kernel(
    Q, K, V, O, LSE, Offsets, NumTargets, RelBias,
    H, max_seqlen, scale, inv_n, causal, has_targets,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, b, h = _program(max_seqlen, H, BLOCK_M)
    start = tl.load(Offsets + b)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    q0 = pid_m * BLOCK_M
    if q0 >= L:
        return
    t0 = L
    if has_targets != 0:
        t0 = L - tl.load(NumTargets + b).to(tl.int32)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    stride_t, dmask, base = _head(start, h, H, offs_d, BLOCK_D)
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=(offs_m[:, None] < L) & dmask,
                other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    kend = tl.where(causal != 0, tl.minimum(q0 + BLOCK_M, L), L)
    # key blocks every row of this block sees in full need no mask
    kfull = (tl.where(causal != 0, tl.minimum(q0 + 1, t0), t0) // BLOCK_N) * BLOCK_N
    for k0 in range(0, kfull, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, RelBias, base, stride_t, offs_m, k0 + offs_n0, offs_d,
                                   dmask, L, t0, causal, h, max_seqlen, scale, qk_scale, inv_n,
                                   SILU, HAS_BIAS, PRECISION, UPCAST, False)
    for k0 in range(kfull, kend, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, RelBias, base, stride_t, offs_m, k0 + offs_n0, offs_d,
                                   dmask, L, t0, causal, h, max_seqlen, scale, qk_scale, inv_n,
                                   SILU, HAS_BIAS, PRECISION, UPCAST, True)
    rmask = offs_m < L
    if not SILU:
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the end see nothing
        acc = acc / l_i[:, None]
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + (start + offs_m) * H + h, lse, mask=rmask)
    tl.store(O + base + offs_m[:, None] * stride_t + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask)


@triton.jit(do_not_specialize=_RUNTIME)
def _jagged_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, DRB, Offsets, NumTargets, RelBias,
    H, max_seqlen, scale, inv_n, causal, has_targets,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n, b, h = _program(max_seqlen, H, BLOCK_N)
    start = tl.load(Offsets + b)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    k0 = pid_n * BLOCK_N
    if k0 >= L:
        return
    t0 = L
    if has_targets != 0:
        t0 = L - tl.load(NumTargets + b).to(tl.int32)
    offs_n = k0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    stride_t, dmask, base = _head(start, h, H, offs_d, BLOCK_D)
    kmask = (offs_n[:, None] < L) & dmask
    k = tl.load(K + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qstart = tl.where(causal != 0, (k0 // BLOCK_M) * BLOCK_M, 0)
    for q0 in range(qstart, L, BLOCK_M):
        offs_m = q0 + offs_m0
        qmask = (offs_m[:, None] < L) & dmask
        q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=qmask, other=0.0)
        # transposed tile: rows are keys, columns queries
        sT = _dot(k, tl.trans(q), PRECISION, UPCAST) * scale
        visT = tl.trans(_visible(offs_m, offs_n, L, t0, causal))
        if HAS_BIAS:
            relT = tl.abs(offs_n[:, None] - offs_m[None, :])
            sT += tl.load(RelBias + h * max_seqlen + relT, mask=visT, other=0.0).to(tl.float32)
        dpT = _dot(v, tl.trans(do), PRECISION, UPCAST)
        if SILU:
            sg = tl.sigmoid(sT)
            pT = sT * sg * inv_n
            dsT = dpT * sg * (1.0 + sT * (1.0 - sg)) * inv_n
        else:
            lse = tl.load(LSE + (start + offs_m) * H + h, mask=offs_m < L, other=0.0)
            delta = tl.load(Delta + (start + offs_m) * H + h, mask=offs_m < L, other=0.0)
            pT = tl.exp2((sT - lse[None, :]) * 1.4426950408889634)
            dsT = pT * (dpT - delta[None, :])
        pT = tl.where(visT, pT, 0.0)
        dsT = tl.where(visT, dsT, 0.0)
        dv += _dot(pT.to(do.dtype), do, PRECISION, UPCAST)
        dk += _dot(dsT.to(q.dtype), q, PRECISION, UPCAST)
        if HAS_BIAS:
            tl.atomic_add(DRB + h * max_seqlen + relT, dsT, mask=visT)
    tl.store(DK + base + offs_n[:, None] * stride_t + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV + base + offs_n[:, None] * stride_t + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, K, V, RelBias, base, stride_t, offs_m, offs_n, offs_d, dmask, L, t0, causal, h,
              max_seqlen, scale, inv_n, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the dq pass; MASKED as in _fwd_block."""
    if MASKED:
        kmask = (offs_n[:, None] < L) & dmask
        vis = _visible(offs_m, offs_n, L, t0, causal)
        bmask = vis
    else:
        kmask = (offs_n[:, None] >= 0) & dmask
        bmask = (offs_m[:, None] < L) & (offs_n[None, :] >= 0)
    k = tl.load(K + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kmask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    if HAS_BIAS:
        rel = tl.abs(offs_m[:, None] - offs_n[None, :])
        s += tl.load(RelBias + h * max_seqlen + rel, mask=bmask, other=0.0).to(tl.float32)
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
    if SILU:
        sg = tl.sigmoid(s)
        ds = dp * sg * (1.0 + s * (1.0 - sg)) * inv_n
    else:
        p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
        ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(vis, ds, 0.0)
    dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    return dq


@triton.jit(do_not_specialize=_RUNTIME)
def _jagged_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Offsets, NumTargets, RelBias,
    H, max_seqlen, scale, inv_n, causal, has_targets,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, b, h = _program(max_seqlen, H, BLOCK_M)
    start = tl.load(Offsets + b)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    q0 = pid_m * BLOCK_M
    if q0 >= L:
        return
    t0 = L
    if has_targets != 0:
        t0 = L - tl.load(NumTargets + b).to(tl.int32)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    stride_t, dmask, base = _head(start, h, H, offs_d, BLOCK_D)
    qmask = (offs_m[:, None] < L) & dmask
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=qmask, other=0.0)
    if SILU:
        lse = tl.zeros([BLOCK_M], tl.float32)
        delta = lse
    else:
        lse = tl.load(LSE + (start + offs_m) * H + h, mask=offs_m < L, other=0.0)
        delta = tl.load(Delta + (start + offs_m) * H + h, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kend = tl.where(causal != 0, tl.minimum(q0 + BLOCK_M, L), L)
    kfull = (tl.where(causal != 0, tl.minimum(q0 + 1, t0), t0) // BLOCK_N) * BLOCK_N
    for k0 in range(0, kfull, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, K, V, RelBias, base, stride_t, offs_m, k0 + offs_n0, offs_d, dmask, L,
                       t0, causal, h, max_seqlen, scale, inv_n, SILU, HAS_BIAS, PRECISION, UPCAST, False)
    for k0 in range(kfull, kend, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, K, V, RelBias, base, stride_t, offs_m, k0 + offs_n0, offs_d, dmask, L,
                       t0, causal, h, max_seqlen, scale, inv_n, SILU, HAS_BIAS, PRECISION, UPCAST, True)
    tl.store(DQ + base + offs_m[:, None] * stride_t + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask)


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1"


BLOCK_OVERRIDE = {}  # {"fwd"|"dkdv"|"dq": (BLOCK_M, BLOCK_N, num_warps, num_stages)}, for tuning
# Tests set this to run the GPU's tiles under the interpreter.
GPU_TILES = False
KERNELS = ("fwd", "dkdv", "dq")
DTYPES = (torch.float32, torch.bfloat16)
ACTIVATIONS = ("softmax", "silu")
# Dh = 256 in float32 needs more than sm_90's 227 KB of shared memory with these tiles.
MAX_HEAD_DIM = 128


def gpu_blocks(kernel, head_dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel "fwd", "dkdv" or "dq" on the GPU.

    Defaults follow the flash-attention-2 Triton recipe for Hopper at Dh <= 64
    in 16-bit (forward 128x64; backward 32x128 tiles for dk/dv, 128x32 for
    dq); larger heads or float32 take smaller tiles.
    """
    small = head_dim <= 64 and dtype.itemsize <= 2
    if kernel == "fwd":
        return (128, 64, 4, 3) if small else (64, 32, 4, 2)
    if kernel == "dkdv":
        return (32, 128, 4, 3) if small else (32, 64, 4, 2)
    return (128, 32, 4, 3) if small else (64, 32, 4, 2)


def _blocks(q, kernel):
    if kernel in BLOCK_OVERRIDE:
        return BLOCK_OVERRIDE[kernel]
    if _interpreting(q) and not GPU_TILES:
        return 32, 32, 4, 1  # small tiles keep numpy fast
    return gpu_blocks(kernel, q.shape[-1], q.dtype)


def grid(max_seqlen, block, B, H):
    """Launch grid of ``block``-long blocks over B sequences of at most max_seqlen, H heads."""
    n = triton.cdiv(max_seqlen, block) * B * H
    if n >= 2**31:
        raise ValueError(f"jagged attention needs {n} programs (B={B}, H={H}, max_seqlen={max_seqlen}); "
                         f"a CUDA grid holds fewer than 2^31")
    return (n,)


def constexprs(head_dim, dtype, activation, has_bias, precision, interpreting):
    """The kernels' compile-time arguments other than the block sizes.

    The kernels see head dims padded to BLOCK_D (``_pad``): a GPU needs one
    kernel per power of two, not one per head dim.
    """
    return dict(BLOCK_D=padded_head_dim(head_dim), SILU=activation == "silu", HAS_BIAS=has_bias, PRECISION=precision,
                UPCAST=interpreting and dtype.itemsize < 4)


def padded_head_dim(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _pad(t, width):
    """[T, H, D] zero-padded to [T, H, width]: zero lanes add nothing to q.k and give zero output lanes."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


# tl.dot's input precision for float32, chosen by UNIREC_TRITON_F32_PRECISION (the first is the default).
F32_PRECISIONS = ("ieee", "tf32")


def precision(dtype):
    if dtype != torch.float32:
        return "ieee"
    p = os.environ.get("UNIREC_TRITON_F32_PRECISION", F32_PRECISIONS[0])
    if p not in F32_PRECISIONS:
        raise ValueError(f"UNIREC_TRITON_F32_PRECISION must be one of {F32_PRECISIONS}, got {p!r}")
    return p


def _precision(q):
    return precision(q.dtype)


def _check(q, k, v, offsets, max_seqlen, num_targets, activation, rel_bias):
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation must be "softmax" or "silu", got {activation!r}')
    if q.dtype not in DTYPES:
        raise ValueError(f"the Triton kernels take q of dtype float32 or bfloat16, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [total, H, Dh], got shape {tuple(q.shape)}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got {q.shape[2]}")
    # Offsets within a sequence are 32-bit: rows (rounded up to the largest tile) x H x Dh (padded).
    if triton.cdiv(max_seqlen, 128) * 128 * q.shape[1] * padded_head_dim(q.shape[2]) >= 2**31:
        raise ValueError(f"max_seqlen * H * Dh = {max_seqlen} * {q.shape[1]} * {q.shape[2]} must stay below 2^31 "
                         f"for the Triton kernels")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("offsets", offsets), ("num_targets", num_targets), ("rel_bias", rel_bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a 1-D int64 tensor of B+1 entries, got {offsets.dtype} {tuple(offsets.shape)}")
    B = offsets.numel() - 1
    if num_targets is not None and (num_targets.dtype != torch.int64 or num_targets.shape != (B,)):
        raise ValueError(f"num_targets must be int64 [{B}], got {num_targets.dtype} {tuple(num_targets.shape)}")
    if rel_bias is not None and (tuple(rel_bias.shape) != (q.shape[1], max_seqlen) or rel_bias.dtype != q.dtype):
        raise ValueError(f"rel_bias must be [H, max_seqlen] = [{q.shape[1]}, {max_seqlen}] of q's dtype, "
                         f"got {rel_bias.dtype} {tuple(rel_bias.shape)}")
    lengths = offsets[1:] - offsets[:-1]
    bad = torch.stack([
        offsets[0] != 0, offsets[-1] != q.shape[0], (lengths < 0).any(), (lengths > max_seqlen).any(),
        ((num_targets < 0) | (num_targets > lengths)).any() if num_targets is not None else offsets[0] != offsets[0],
    ]).tolist()
    msgs = ["offsets[0] must be 0", f"offsets[-1] must equal q.shape[0] ({q.shape[0]})", "offsets must not decrease",
            f"a sequence is longer than max_seqlen = {max_seqlen}", "num_targets[b] must be in [0, length of b]"]
    for flag, msg in zip(bad, msgs):
        if flag:
            raise ValueError(msg)


def _dense(t):
    """t contiguous and 16-byte aligned, as every compiled kernel assumes (copies only unusual views)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _common(q, num_targets, rel_bias, activation, offsets):
    meta = constexprs(q.shape[2], q.dtype, activation, rel_bias is not None, _precision(q), _interpreting(q))
    offsets = _dense(offsets)
    nt = _dense(num_targets) if num_targets is not None else offsets
    rb = _dense(rel_bias) if rel_bias is not None else q
    return meta, offsets, nt, rb


def jagged_attention_fwd_triton(q, k, v, offsets, max_seqlen, causal, num_targets, activation, rel_bias, scale):
    """Forward: (out [total, H, Dh], lse [total, H] float32, [0] for silu)."""
    _check(q, k, v, offsets, max_seqlen, num_targets, activation, rel_bias)
    T, H, D = q.shape
    B = offsets.numel() - 1
    silu = activation == "silu"
    lse = q.new_empty((0,) if silu else (T, H), dtype=torch.float32)
    if T == 0 or B == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), lse
    meta, offsets, nt, rb = _common(q, num_targets, rel_bias, activation, offsets)
    q, k, v = (_dense(_pad(t, meta["BLOCK_D"])) for t in (q, k, v))
    out = torch.empty_like(q)
    BM, BN, warps, stages = _blocks(q, "fwd")
    # silu saves no lse; a float32 stand-in keeps the argument types (and so the compiled kernel) fixed
    lse_arg = lse if not silu else q.new_empty(1, dtype=torch.float32)
    _jagged_attention_fwd_kernel[grid(max_seqlen, BM, B, H)](
        q, k, v, out, lse_arg, offsets, nt, rb, H, max_seqlen, float(scale), 1.0 / max(max_seqlen, 1),
        int(bool(causal)), int(num_targets is not None), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
        **meta)
    return out[..., :D].contiguous(), lse


def jagged_attention_bwd_triton(grad_out, q, k, v, out, lse, offsets, max_seqlen, causal, num_targets, activation,
                                rel_bias, scale):
    """Backward: (dq, dk, dv, drel_bias ([H, max_seqlen], [0] without rel_bias))."""
    _check(q, k, v, offsets, max_seqlen, num_targets, activation, rel_bias)
    T, H, D = q.shape
    B = offsets.numel() - 1
    silu = activation == "silu"
    drb = torch.zeros(rel_bias.shape, dtype=torch.float32, device=q.device) if rel_bias is not None else None
    if T == 0 or B == 0:
        dq, dk, dv = (torch.zeros(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        meta, offsets, nt, rb = _common(q, num_targets, rel_bias, activation, offsets)
        if silu:
            lse_t = delta = q.new_empty(1, dtype=torch.float32)
        else:
            lse_t = _dense(lse.float())
            delta = (grad_out.to(q.dtype).float() * out.float()).sum(-1).contiguous()  # [T, H]
        q, k, v, do = (_dense(_pad(t, meta["BLOCK_D"])) for t in (q, k, v, grad_out.to(q.dtype)))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (H, max_seqlen, float(scale), 1.0 / max(max_seqlen, 1), int(bool(causal)),
                  int(num_targets is not None))
        BM, BN, warps, stages = _blocks(q, "dkdv")
        _jagged_attention_bwd_dkdv_kernel[grid(max_seqlen, BN, B, H)](
            q, k, v, do, lse_t, delta, dk, dv, drb if drb is not None else delta, offsets, nt, rb, *common,
            BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages, **meta)
        BM, BN, warps, stages = _blocks(q, "dq")
        _jagged_attention_bwd_dq_kernel[grid(max_seqlen, BM, B, H)](
            q, k, v, do, lse_t, delta, dq, offsets, nt, rb, *common,
            BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages, **meta)
        dq, dk, dv = (t[..., :D].contiguous() for t in (dq, dk, dv))
    drb = drb.to(q.dtype) if drb is not None else q.new_empty(0)
    return dq, dk, dv, drb
