"""Triton kernels of the full-catalogue softmax cross-entropy (Liger-Kernel /
"cut cross-entropy" style): logits are made block by block with tl.dot and
never stored.

- ``_softmax_ce_fwd_kernel``: one program per (block of rows, span of items)
  walks its items with a running max and sum of exp (online log-sum-exp) and
  picks the target logit on the way; the spans (enough to fill the GPU when
  M is small) are merged into loss_per_row and lse by a few torch ops on [S, M].
- ``_softmax_ce_bwd_dh_kernel``: one program per (block of rows, span) recomputes
  each logits block, dz = g (softmax - (1-eps) onehot - eps/N), and
  accumulates its span's share of dhidden = dz @ items in registers; the
  [S, M, D] shares are summed.
- ``_softmax_ce_bwd_de_kernel``: one program per block of items does the same
  over all rows for ditems = dz^T @ hidden and dbias = sum_rows dz.
No atomics: every output block has one owner, so results are deterministic.
Memory beyond inputs and outputs: O(S * M * D) float32 for the dhidden shares.
The whole of D is one block (D padded to a power of two, >= 16).

Importing this module imports triton; unirec imports it only when a Triton
kernel runs.
"""
import torch
import triton
import triton.language as tl


# Sizes that vary per call are not specialised (no recompilation for every
# M, N or 1-valued flag); strides stay specialised for vectorised loads.
_RUNTIME = ["M", "N", "has_bias"]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    # PRECISION "upcast": the interpreter's bfloat16 tl.dot is wrong (triton
    # 3.9 on CPU), so there both operands go through float32 exactly.
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, has_bias, PRECISION: tl.constexpr):
    e = tl.load(E + rn.to(tl.int64)[:, None] * stride_e + rd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    z = _dot(h, tl.trans(e), tl.zeros((h.shape[0], e.shape[0]), tl.float32), PRECISION)
    z += tl.load(BIAS + rn, mask=nmask & ((rn * 0 + has_bias) > 0), other=0.0).to(tl.float32)[None, :]
    return z, e


@triton.jit(do_not_specialize=_RUNTIME + ["span", "ignore_index"])
def _softmax_ce_fwd_kernel(H, E, BIAS, T, PMAX, PSUM, PZT, PZS, M, N, D, stride_h, stride_e, span, ignore_index,
                           has_bias, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (row block, split s) covers items [s*span, (s+1)*span) and writes
    # its partial max / sum of exp / target logit / sum of logits to row s of
    # the partial outputs [S, M]; the caller merges the splits.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mmask = rm < M
    dmask = rd < D
    tgt = tl.load(T + rm, mask=mmask, other=ignore_index)
    h = tl.load(H + rm.to(tl.int64)[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    zt = tl.zeros((BLOCK_M,), tl.float32)
    zs = tl.zeros((BLOCK_M,), tl.float32)
    n_end = tl.minimum(N, (split + 1) * span)
    for n0 in range(split * span, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < n_end
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, has_bias, PRECISION)
        z = tl.where(nmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m_i = m_new
        zt += tl.sum(tl.where(rn[None, :] == tgt[:, None], z, 0.0), 1)
        zs += tl.sum(tl.where(nmask[None, :], z, 0.0), 1)
    off = split.to(tl.int64) * M + rm
    tl.store(PMAX + off, m_i, mask=mmask)
    tl.store(PSUM + off, s_i, mask=mmask)
    tl.store(PZT + off, zt, mask=mmask)
    tl.store(PZS + off, zs, mask=mmask)


@triton.jit
def _dz_block(z, rn, nmask, lse, g, tgt, N, eps):
    dz = tl.exp(z - lse[:, None]) * g[:, None]
    dz -= (g * (eps / N))[:, None]
    dz -= tl.where(rn[None, :] == tgt[:, None], (g * (1.0 - eps))[:, None], 0.0)
    return tl.where(nmask[None, :], dz, 0.0)


@triton.jit(do_not_specialize=_RUNTIME + ["span", "eps"])
def _softmax_ce_bwd_dh_kernel(H, E, BIAS, T, G, LSE, DH, M, N, D, stride_h, stride_e, span, eps,
                              has_bias, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (row block, split s) writes its items' share of dhidden to DH[s].
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mmask = rm < M
    dmask = rd < D
    tgt = tl.load(T + rm, mask=mmask, other=-1)
    g = tl.load(G + rm, mask=mmask, other=0.0)  # 0 on ignored rows (set by the caller)
    lse = tl.load(LSE + rm, mask=mmask, other=0.0)
    h = tl.load(H + rm.to(tl.int64)[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_end = tl.minimum(N, (split + 1) * span)
    for n0 in range(split * span, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < n_end
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, has_bias, PRECISION)
        dz = _dz_block(z, rn, nmask, lse, g, tgt, N, eps)
        acc = _dot(dz.to(e.dtype), e, acc, PRECISION)
    tl.store(DH + (split.to(tl.int64) * M + rm)[:, None] * D + rd[None, :], acc, mask=mmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=_RUNTIME + ["eps"])
def _softmax_ce_bwd_de_kernel(H, E, BIAS, T, G, LSE, DE, DB, M, N, D, stride_h, stride_e, eps,
                              has_bias, BLOCK_M: tl.constexpr,
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
        h = tl.load(H + rm.to(tl.int64)[:, None] * stride_h + rd[None, :], mask=mmask[:, None] & dmask[None, :],
                    other=0.0)
        z, e = _logits_block(h, E, BIAS, rn, rd, nmask, dmask, stride_e, has_bias, PRECISION)
        dz = _dz_block(z, rn, nmask, lse, g, tgt, N, eps)
        dz = tl.where(mmask[:, None], dz, 0.0)
        acc = _dot(tl.trans(dz.to(h.dtype)), h, acc, PRECISION)
        dbias += tl.sum(dz, 0)
    tl.store(DE + rn.to(tl.int64)[:, None] * D + rd[None, :], acc.to(DE.dtype.element_ty),
             mask=nmask[:, None] & dmask[None, :])
    tl.store(DB + rn, dbias.to(DB.dtype.element_ty), mask=nmask & ((rn * 0 + has_bias) > 0))


# Tests set this to run the GPU's tiles under the interpreter.
GPU_TILES = False
KERNELS = ("fwd", "bwd_dh", "bwd_de")
DTYPES = (torch.float32, torch.bfloat16)
# The whole of D is one block: wider rows would not fit the tiles in shared memory (float32 at D > 512 needs
# 384 KB on sm_90, found by scripts/compile_triton.py).
MAX_D = {torch.float32: 512, torch.bfloat16: 1024}


def gpu_config(D: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) on the GPU for width D.

    The whole of D sits in one block: keep (BLOCK_M + BLOCK_N) x BLOCK_D tiles
    (pipelined) within shared memory (checked by scripts/compile_triton.py).
    """
    block_d = max(16, triton.next_power_of_2(D))
    if block_d >= 512:
        return 32, 32, block_d, 8
    if block_d >= 256:
        return 64, 64, block_d, 8
    return 64, 128, block_d, 4


def _config(hidden: torch.Tensor, D: int):
    if hidden.device.type == "cpu" and not GPU_TILES:  # the interpreter: few, large programs
        return 32, 32, max(16, triton.next_power_of_2(D)), 4
    return gpu_config(D)


def precision(dtype: torch.dtype, interpreting: bool) -> str:
    # float32 computes in full precision ("ieee"), never silently in tf32.
    if interpreting and dtype != torch.float32:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _precision(t: torch.Tensor) -> str:
    return precision(t.dtype, t.device.type == "cpu")


def int_class(x: int) -> str:
    """How Triton specialises an integer argument: "1" (a constant), "16" (divisible by 16) or "" (neither)."""
    return "1" if x == 1 else "16" if x % 16 == 0 else ""


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t, or a dense copy where the compiled kernels' assumptions fail.

    A row-strided view (e.g. a slice of a larger table) is used in place when
    its row stride specialises like D and it is 16-byte aligned: every kernel a
    GPU can need is then one of those scripts/compile_triton.py compiles.
    """
    ok = (t.stride(-1) == 1 and int_class(t.stride(0)) == int_class(t.shape[1]) and t.stride(0) < 2**31
          and t.data_ptr() % 16 == 0)
    return t if ok else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _rows1(t: torch.Tensor) -> torch.Tensor:
    """A 1-D t contiguous and 16-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_width(D: int, dtype: torch.dtype):
    if D > MAX_D.get(dtype, 0):
        raise ValueError(f"the Triton kernels take rows of at most {MAX_D.get(dtype, 0)} elements (D) in {dtype}, "
                         f"got {D}")


def _splits(hidden: torch.Tensor, M: int, N: int, bm: int, bn: int):
    """Cut the items into S spans so that row blocks x S fill the GPU (the
    interpreter uses 2 spans, so tests cover the merge)."""
    n_blocks = triton.cdiv(N, bn)
    if hidden.device.type == "cpu":
        target = 2
    else:
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        target = triton.cdiv(4 * sms, triton.cdiv(M, bm))
    s = max(1, min(n_blocks, target))
    span = triton.cdiv(n_blocks, s) * bn
    return triton.cdiv(N, span), span


def softmax_ce_fwd_triton(hidden, items, targets, item_bias, ignore_index: int, label_smoothing: float):
    M, D = hidden.shape
    N = items.shape[0]
    _check_width(D, hidden.dtype)
    hidden, items, targets = _rows(hidden), _rows(items), _rows1(targets)
    if M == 0:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    bm, bn, bd, warps = _config(hidden, D)
    S, span = _splits(hidden, M, N, bm, bn)
    part = torch.empty(4, S, M, dtype=torch.float32, device=hidden.device)
    bias = _rows1(item_bias) if item_bias is not None else items
    _softmax_ce_fwd_kernel[(triton.cdiv(M, bm), S)](
        hidden, items, bias, targets, part[0], part[1], part[2], part[3], M, N, D, hidden.stride(0),
        items.stride(0), span, ignore_index, int(item_bias is not None),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(hidden), num_warps=warps)
    pmax, psum, pzt, pzs = part
    gmax = pmax.max(0).values
    lse = gmax + (psum * torch.exp(pmax - gmax)).sum(0).log()
    loss = lse - (1.0 - label_smoothing) * pzt.sum(0)
    if label_smoothing > 0:
        loss = loss - label_smoothing / N * pzs.sum(0)
    loss = torch.where(targets == ignore_index, 0.0, loss)
    return loss, lse


def softmax_ce_bwd_triton(grad_loss, hidden, items, targets, item_bias, lse, ignore_index: int,
                          label_smoothing: float):
    M, D = hidden.shape
    N = items.shape[0]
    _check_width(D, hidden.dtype)
    hidden, items, targets = _rows(hidden), _rows(items), _rows1(targets)
    g = torch.where(targets != ignore_index, grad_loss.float(), 0.0).contiguous()
    lse = _rows1(lse.float())
    dh = torch.zeros(M, D, dtype=torch.float32, device=hidden.device)
    # Each ditems / dbias block has one owner, which on the GPU stores it in the
    # inputs' dtype directly (float32 accumulation in registers, round to
    # nearest): no [N, D] float32 copy. The interpreter's float32 -> bfloat16
    # store truncates, so there the blocks go through float32.
    out_dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    de = torch.zeros(N, D, dtype=out_dtype, device=hidden.device)
    db = torch.zeros(N, dtype=out_dtype, device=hidden.device)
    if M > 0 and N > 0:
        bm, bn, bd, warps = _config(hidden, D)
        S, span = _splits(hidden, M, N, bm, bn)
        bias = _rows1(item_bias) if item_bias is not None else items
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=_precision(hidden), num_warps=warps)
        dh_part = torch.empty(S, M, D, dtype=torch.float32, device=hidden.device)
        _softmax_ce_bwd_dh_kernel[(triton.cdiv(M, bm), S)](
            hidden, items, bias, targets, g, lse, dh_part, M, N, D, hidden.stride(0), items.stride(0), span,
            float(label_smoothing), int(item_bias is not None), **common)
        dh = dh_part.sum(0) if S > 1 else dh_part[0]
        _softmax_ce_bwd_de_kernel[(triton.cdiv(N, bn),)](
            hidden, items, bias, targets, g, lse, de, db, M, N, D, hidden.stride(0), items.stride(0),
            float(label_smoothing), int(item_bias is not None), **common)
    return dh.to(hidden.dtype), de.to(hidden.dtype), db.to(hidden.dtype)
