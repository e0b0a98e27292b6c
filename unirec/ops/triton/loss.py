"""Triton kernels of the full-catalogue softmax cross-entropy (Liger-Kernel /
"cut cross-entropy" style): logits are made block by block with tl.dot and
never stored.

- ``_softmax_ce_fwd_kernel``: one program per block of rows walks all items
  with a running max and sum of exp (online log-sum-exp) and picks the target
  logit on the way; writes loss_per_row and lse.
- ``_softmax_ce_bwd_dh_kernel``: one program per block of rows recomputes each
  logits block, dz = g (softmax - (1-eps) onehot - eps/N), and accumulates
  dhidden = dz @ items in registers.
- ``_softmax_ce_bwd_de_kernel``: one program per block of items does the same
  over all rows for ditems = dz^T @ hidden and dbias = sum_rows dz.
No atomics: every output block has one owner, so results are deterministic.
The whole of D is one block (D padded to a power of two, >= 16).

Importing this module imports triton; unirec imports it only when a Triton
kernel runs.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.load(E + rn[:, None] * stride_e + rd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    z = tl.dot(h, tl.trans(e), input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    return z, e


@triton.jit
def _softmax_ce_fwd_kernel(H, E, BIAS, T, LOSS, LSE, M, N, D, stride_h, stride_e, ignore_index, eps,
                           HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mmask = rm < M
    dmask = rd < D
    tgt = tl.load(T + rm, mask=mmask, other=ignore_index)
    h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    zt = tl.zeros((BLOCK_M,), tl.float32)
    zs = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, HAS_BIAS, PRECISION)
        z = tl.where(nmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m_i = m_new
        zt += tl.sum(tl.where(rn[None, :] == tgt[:, None], z, 0.0), 1)
        if SMOOTH:
            zs += tl.sum(tl.where(nmask[None, :], z, 0.0), 1)
    lse = m_i + tl.log(s_i)
    loss = lse - (1.0 - eps) * zt
    if SMOOTH:
        loss -= eps / N * zs
    loss = tl.where(tgt == ignore_index, 0.0, loss)
    tl.store(LOSS + rm, loss, mask=mmask)
    tl.store(LSE + rm, lse, mask=mmask)


@triton.jit
def _dz_block(z, rn, nmask, lse, g, tgt, N, eps, SMOOTH: tl.constexpr):
    dz = tl.exp(z - lse[:, None]) * g[:, None]
    if SMOOTH:
        dz -= (g * (eps / N))[:, None]
    dz -= tl.where(rn[None, :] == tgt[:, None], (g * (1.0 - eps))[:, None], 0.0)
    return tl.where(nmask[None, :], dz, 0.0)


@triton.jit
def _softmax_ce_bwd_dh_kernel(H, E, BIAS, T, G, LSE, DH, M, N, D, stride_h, stride_e, eps,
                              HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mmask = rm < M
    dmask = rd < D
    tgt = tl.load(T + rm, mask=mmask, other=-1)
    g = tl.load(G + rm, mask=mmask, other=0.0)  # 0 on ignored rows (set by the caller)
    lse = tl.load(LSE + rm, mask=mmask, other=0.0)
    h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, HAS_BIAS, PRECISION)
        dz = _dz_block(z, rn, nmask, lse, g, tgt, N, eps, SMOOTH)
        acc = tl.dot(dz.to(e.dtype), e, acc, input_precision=PRECISION)
    tl.store(DH + rm[:, None] * D + rd[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _softmax_ce_bwd_de_kernel(H, E, BIAS, T, G, LSE, DE, DB, M, N, D, stride_h, stride_e, eps,
                              HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    nmask = rn < N
    dmask = rd < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dbias = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < M
        tgt = tl.load(T + rm, mask=mmask, other=-1)
        g = tl.load(G + rm, mask=mmask, other=0.0)
        lse = tl.load(LSE + rm, mask=mmask, other=0.0)
        h = tl.load(H + rm[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, HAS_BIAS, PRECISION)
        dz = _dz_block(z, rn, nmask, lse, g, tgt, N, eps, SMOOTH)
        dz = tl.where(mmask[:, None], dz, 0.0)
        acc = tl.dot(tl.trans(dz.to(h.dtype)), h, acc, input_precision=PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(dz, 0)
    tl.store(DE + rn[:, None] * D + rd[None, :], acc, mask=nmask[:, None] & dmask[None, :])
    if HAS_BIAS:
        tl.store(DB + rn, dbias, mask=nmask)


def _config(hidden: torch.Tensor, D: int):
    block_d = max(16, triton.next_power_of_2(D))
    if hidden.device.type == "cpu":  # the interpreter: few, large programs
        return 32, 32, block_d, 4
    if block_d >= 256:
        return 64, 64, block_d, 8
    return 64, 128, block_d, 4


def _precision(dtype: torch.dtype) -> str:
    # float32 computes in full precision ("ieee"), never silently in tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def softmax_ce_fwd_triton(hidden, items, targets, item_bias, ignore_index: int, label_smoothing: float):
    M, D = hidden.shape
    N = items.shape[0]
    hidden, items, targets = hidden.contiguous(), items.contiguous(), targets.contiguous()
    loss = torch.empty(M, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(M, dtype=torch.float32, device=hidden.device)
    if M == 0:
        return loss, lse
    bm, bn, bd, warps = _config(hidden, D)
    bias = item_bias.contiguous() if item_bias is not None else items
    _softmax_ce_fwd_kernel[(triton.cdiv(M, bm),)](
        hidden, items, bias, targets, loss, lse, M, N, D, hidden.stride(0), items.stride(0), ignore_index,
        float(label_smoothing), HAS_BIAS=item_bias is not None, SMOOTH=label_smoothing > 0, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(hidden.dtype), num_warps=warps)
    return loss, lse


def softmax_ce_bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, ignore_index: int,
                          label_smoothing: float):
    M, D = hidden.shape
    N = items.shape[0]
    hidden, items, targets = hidden.contiguous(), items.contiguous(), targets.contiguous()
    g = torch.where(targets != ignore_index, grad_loss.float(), 0.0).contiguous()
    lse = lse.float().contiguous()
    dh = torch.zeros(M, D, dtype=torch.float32, device=hidden.device)
    de = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if M > 0 and N > 0:
        bm, bn, bd, warps = _config(hidden, D)
        bias = item_bias.contiguous() if item_bias is not None else items
        common = dict(HAS_BIAS=item_bias is not None, SMOOTH=label_smoothing > 0, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=bd, PRECISION=_precision(hidden.dtype), num_warps=warps)
        _softmax_ce_bwd_dh_kernel[(triton.cdiv(M, bm),)](
            hidden, items, bias, targets, g, lse, dh, M, N, D, hidden.stride(0), items.stride(0),
            float(label_smoothing), **common)
        _softmax_ce_bwd_de_kernel[(triton.cdiv(N, bn),)](
            hidden, items, bias, targets, g, lse, de, db, M, N, D, hidden.stride(0), items.stride(0),
            float(label_smoothing), **common)
    dt = hidden.dtype
    return dh.to(dt), de.to(dt), db.to(dt)
