"""softmax_cross_entropy: every backend against F.cross_entropy on materialised logits."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import unirec  # noqa: F401
from unirec.ops import softmax_cross_entropy
from unirec.ops.reference import softmax_cross_entropy_ref

try:
    from conftest import DEVICES
except ImportError:  # pragma: no cover
    DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _impls(device):
    # "auto" on CUDA is the Triton kernel registered for the op; "triton" on CPU
    # runs the same kernels in the interpreter.
    return ["cpp", "triton"] if device == "cpu" else ["auto", "triton"]


def _keeps(impl, device):
    """The C++ kernel with and without the kept logit gradient; one way elsewhere."""
    return [True, False] if device == "cpu" and impl == "cpp" else [None]


SHAPES = [(37, 100, 13), (1, 1, 1), (64, 257, 32), (20, 70, 100)]
# On the GPU every block width / dtype compiles its own Triton kernels: two
# widths (D 13 -> 16, D 100 -> 128) keep the file well under a minute there.
CUDA_SHAPES = [(37, 100, 13), (20, 70, 100)]


def _cases():
    for device in DEVICES:
        dev = device.values[0] if hasattr(device, "values") else device
        marks = device.marks if hasattr(device, "marks") else ()
        # "cpp-recompute": the C++ kernel without the kept logit gradient.
        for impl in ["cpp", "cpp-recompute", "triton", "auto"]:
            if (dev == "cpu" and impl == "auto") or (dev == "cuda" and impl.startswith("cpp")):
                continue
            for dtype in [torch.float32, torch.bfloat16, torch.float64]:
                if dtype == torch.float64 and not impl.startswith("cpp"):
                    continue
                for shape in SHAPES if dev == "cpu" else CUDA_SHAPES:
                    yield pytest.param(dev, impl, dtype, shape, marks=marks,
                                       id=f"{dev}-{impl}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}")


def _inputs(M, N, D, device, dtype, bias, n_ignored=3):
    h = torch.randn(M, D, device=device, dtype=dtype) / D**0.25
    e = torch.randn(N, D, device=device, dtype=dtype) / D**0.25
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    t = torch.randint(0, N, (M,), device=device)
    t[torch.randperm(M, device=device)[: min(n_ignored, M - 1)]] = -100
    return h, e, b, t


def _loss_and_grads(fn, h, e, b, t, reduction, eps):
    h, e = h.detach().requires_grad_(), e.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    loss = fn(h, e, t, b, reduction, eps)
    gen = torch.Generator().manual_seed(1)  # the same output gradient for every implementation
    gout = torch.randn(loss.shape, generator=gen).to(device=loss.device, dtype=loss.dtype)
    grads = torch.autograd.grad(loss, [x for x in (h, e, b) if x is not None], gout)
    return [loss, *grads]


def _lowprec_torch(h, e, t, b, reduction, eps):
    """Materialised logits in the low dtype itself: the error scale the kernels are judged against."""
    z = h @ e.T + (b if b is not None else 0)
    per_row = F.cross_entropy(z, t, reduction="none", label_smoothing=eps)
    if reduction == "none":
        return per_row
    s = per_row.sum()
    return s if reduction == "sum" else s / (t != -100).sum().clamp_min(1)


@pytest.mark.parametrize("device,impl,dtype,shape", list(_cases()))
@pytest.mark.parametrize("bias,reduction,eps", [(False, "mean", 0.0), (True, "sum", 0.1), (True, "none", 0.0)])
def test_against_reference(device, impl, dtype, shape, bias, reduction, eps):
    M, N, D = shape
    h, e, b, t = _inputs(M, N, D, device, dtype, bias)

    def ours(h, e, t, b, reduction, eps):
        keep = False if impl == "cpp-recompute" else None
        return softmax_cross_entropy(h, e, t, item_bias=b, reduction=reduction, label_smoothing=eps,
                                     impl=impl.split("-")[0], keep_logit_grad=keep)

    def ref64(h, e, t, b, reduction, eps):
        return softmax_cross_entropy_ref(h.double(), e.double(), t, None if b is None else b.double(), -100,
                                         reduction, eps)

    got = _loss_and_grads(ours, h, e, b, t, reduction, eps)
    exact = _loss_and_grads(ref64, h, e, b, t, reduction, eps)
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape
    for g in got[1:]:
        assert g.dtype == dtype
    if dtype == torch.bfloat16:
        low = _loss_and_grads(_lowprec_torch, h, e, b, t, reduction, eps)
        for x, y, z in zip(got, exact, low):
            err = (x.double() - y.double()).abs().max().item()
            ref_err = (z.double() - y.double()).abs().max().item()
            assert err <= 2 * ref_err + 1e-4, (err, ref_err)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for x, y in zip(got, exact):
            torch.testing.assert_close(x.double(), y.double(), atol=tol, rtol=tol * 10)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("N", [1, 7, 100, 1029])
def test_row_kernels_of_each_isa(monkeypatch, isa, keep, N):
    """The C++ kernel's row passes (max, exp, sum; loss_kernels.h) compiled for each instruction set,
    on rows whose length is no multiple of the vector width, with a -inf bias that must carry no mass."""
    monkeypatch.setenv("UNIREC_CPU_ISA", isa)  # capped at what the CPU has
    M, D = 45, 24
    h, e, b, t = _inputs(M, N, D, "cpu", torch.float32, bias=True)
    b[::3] = float("-inf")      # items no row may pick
    b[0] = 0.0
    t = torch.where(t >= 0, torch.zeros_like(t), t)  # targets on the finite item
    for eps in (0.0, 0.1) if N > 1 else (0.0,):
        if eps:   # smoothing spreads mass to every item: finite logits only
            b = torch.where(torch.isinf(b), torch.full_like(b, -30.0), b)
        got = _loss_and_grads(lambda *a: softmax_cross_entropy(*a[:3], item_bias=a[3], reduction=a[4],
                                                               label_smoothing=a[5], impl="cpp",
                                                               keep_logit_grad=keep), h, e, b, t, "none", eps)
        want = _loss_and_grads(lambda *a: softmax_cross_entropy_ref(*a[:4], reduction=a[4], label_smoothing=a[5]),
                               h.double(), e.double(), b.double(), t, "none", eps)
        for name, x, y in zip(["loss", "dh", "de", "db"], got, want):
            assert torch.isfinite(x).all(), name
            torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-5, msg=f"{name} isa={isa} eps={eps}")
        if not eps:
            assert got[3][torch.isinf(b)].eq(0).all()  # exactly no mass, not exp(-87)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, reduction):
    # The documented rule: an all-ignored batch gives loss 0 (torch: NaN for mean) and zero gradients.
    for impl in _impls(device) + ["reference"]:
        for keep in _keeps(impl, device):
            h = torch.randn(5, 8, device=device, requires_grad=True)
            e = torch.randn(30, 8, device=device, requires_grad=True)
            t = torch.full((5,), -100, device=device)
            loss = softmax_cross_entropy(h, e, t, reduction=reduction, impl=impl, keep_logit_grad=keep)
            assert torch.equal(loss.detach(), torch.zeros_like(loss)), impl
            loss.sum().backward()
            assert (h.grad == 0).all() and (e.grad == 0).all(), impl


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_and_empty(device):
    for impl in _impls(device):
        for keep in _keeps(impl, device):
            h = torch.randn(6, 8, device=device, requires_grad=True)
            e = torch.randn(30, 8, device=device)
            t = torch.tensor([1, 7, 7, 29, 0, 7], device=device)
            got = softmax_cross_entropy(h, e, t, ignore_index=7, impl=impl, keep_logit_grad=keep)
            ref = F.cross_entropy(h @ e.T, t, ignore_index=7)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            got.backward()
            want, = torch.autograd.grad(ref, h)
            torch.testing.assert_close(h.grad, want, atol=1e-5, rtol=1e-5)
            empty = softmax_cross_entropy(h[:0], e, t[:0], impl=impl, keep_logit_grad=keep)
            assert empty.item() == 0.0
            empty.backward()
            assert softmax_cross_entropy(h[:0], e, t[:0], reduction="none", impl=impl,
                                         keep_logit_grad=keep).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    h, e = torch.randn(4, 8, device=device), torch.randn(30, 8, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    for impl in _impls(device):
        with pytest.raises(ValueError, match="outside"):
            softmax_cross_entropy(h, e, torch.tensor([0, 30, 1, 2], device=device), impl=impl)
        with pytest.raises(ValueError, match="outside"):
            softmax_cross_entropy(h, e, torch.tensor([0, -1, 1, 2], device=device), impl=impl)
        with pytest.raises(ValueError, match="share D"):
            softmax_cross_entropy(h, torch.randn(30, 7, device=device), t, impl=impl)
        with pytest.raises(ValueError, match="dtype"):
            softmax_cross_entropy(h, e.to(torch.bfloat16), t, impl=impl)
        with pytest.raises(ValueError, match="targets"):
            softmax_cross_entropy(h, e, t.int(), impl=impl)
        with pytest.raises(ValueError, match="targets"):
            softmax_cross_entropy(h, e, t[:3], impl=impl)
        with pytest.raises(ValueError, match="item_bias"):
            softmax_cross_entropy(h, e, t, item_bias=torch.randn(29, device=device), impl=impl)
        with pytest.raises(ValueError, match="label_smoothing"):
            softmax_cross_entropy(h, e, t, label_smoothing=1.5, impl=impl)
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(h, e, t, reduction="avg")
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            softmax_cross_entropy(h, e.cpu(), t)
    with pytest.raises(ValueError, match="keep_logit_grad"):
        softmax_cross_entropy(h, e, t, impl="reference", keep_logit_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    h = torch.randn(9, 12, device=device, requires_grad=True)
    e = torch.randn(40, 12, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (9,), device=device)
    t[2] = -100
    keeps = [False, True] if device == "cpu" else [False]
    for keep in keeps:
        torch.library.opcheck(torch.ops.unirec.softmax_ce_fwd, (h, e, t, b, -100, 0.1, keep))
        torch.library.opcheck(torch.ops.unirec.softmax_ce_fwd, (h, e, t, None, -100, 0.0, keep))
        loss, lse, dz = torch.ops.unirec.softmax_ce_fwd(h.detach(), e.detach(), t, b.detach(), -100, 0.1, keep)
        assert dz.shape == ((9 if keep else 0), 40)
        torch.library.opcheck(torch.ops.unirec.softmax_ce_bwd,
                              (torch.randn_like(loss), h.detach(), e.detach(), t, b.detach(), lse,
                               dz if keep else None, -100, 0.1))


def test_gradcheck_cpu():
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 10, 3, 5])
    for reduction, eps in [("mean", 0.0), ("none", 0.2)]:
        for keep in (True, False):
            torch.autograd.gradcheck(
                lambda h, e, b: softmax_cross_entropy(h, e, t, item_bias=b, reduction=reduction,
                                                      label_smoothing=eps, impl="cpp", keep_logit_grad=keep),
                (h, e, b))


@pytest.mark.parametrize("keep", [True, False])
def test_torch_compile_aot(keep):
    # aot_eager traces the op through its fake kernel and autograd formula (the kept
    # [M, N] logit gradient is an op output there), then runs the real kernels.
    h = torch.randn(10, 6, requires_grad=True)
    e = torch.randn(25, 6, requires_grad=True)
    t = torch.randint(0, 25, (10,))
    t[3] = -100

    def f(h, e):
        return softmax_cross_entropy(h, e, t, impl="cpp", keep_logit_grad=keep, reduction="none").square().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(h, e)
    g_got = torch.autograd.grad(got, (h, e))
    want = softmax_cross_entropy_ref(h, e, t, reduction="none").square().sum()
    g_want = torch.autograd.grad(want, (h, e))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _triton_loss():
    pytest.importorskip("triton")
    from unirec.ops.triton import loss

    return loss


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
@pytest.mark.parametrize("dtype,D", [
    (torch.float32, 100),   # 64x128 tiles, D padded to 128
    (torch.bfloat16, 100),
    (torch.float32, 200),   # 64x64, D to 256
    (torch.float32, 300),   # 32x32, D to 512
], ids=["f32-100", "bf16-100", "f32-200", "f32-300"])
def test_gpu_tiles_in_interpreter(monkeypatch, dtype, D):
    """The tile sizes the GPU selects, on several row and item blocks with odd remainders, against float64."""
    tl_loss = _triton_loss()
    monkeypatch.setattr(tl_loss, "GPU_TILES", True)
    bm, bn, _, _ = tl_loss.gpu_config(D)
    M, N = 2 * bm + 3, 2 * bn + 45
    h, e, b, t = _inputs(M, N, D, "cpu", dtype, bias=True)
    assert tl_loss._config(h, D) == tl_loss.gpu_config(D)

    def ours(h, e, t, b, reduction, eps):
        return softmax_cross_entropy(h, e, t, item_bias=b, reduction=reduction, label_smoothing=eps, impl="triton")

    def ref64(h, e, t, b, reduction, eps):
        return softmax_cross_entropy_ref(h.double(), e.double(), t, b.double(), -100, reduction, eps)

    got = _loss_and_grads(ours, h, e, b, t, "none", 0.1)
    exact = _loss_and_grads(ref64, h, e, b, t, "none", 0.1)
    low = _loss_and_grads(_lowprec_torch, h, e, b, t, "none", 0.1) if dtype == torch.bfloat16 else None
    for i, (x, y) in enumerate(zip(got, exact)):
        if low is None:
            torch.testing.assert_close(x.double(), y.double(), atol=1e-5, rtol=1e-4)
        else:
            ref_err = (low[i].double() - y.double()).abs().max().item()
            assert (x.double() - y.double()).abs().max().item() <= 2 * ref_err + 1e-4


_OFFSETS_PAST_INT32 = """
import torch
from unirec.ops import softmax_cross_entropy
M, N, D, step = 40, 40, 16, 2**26
torch.manual_seed(0)
h, e, b = torch.randn(M, D).bfloat16(), torch.randn(N, D).bfloat16(), torch.randn(N).bfloat16()
t = torch.randint(0, N, (M,))

def spread(x):
    # virtual memory only: the pages of rows never written stay unallocated
    big = torch.empty((x.shape[0] - 1) * step + D, dtype=x.dtype).as_strided(x.shape, (step, 1))
    return big.copy_(x)

def loss_and_grads(h, e):
    h, e = h.detach().requires_grad_(), e.detach().requires_grad_()
    loss = softmax_cross_entropy(h, e, t, item_bias=b, reduction="sum", label_smoothing=0.1, impl="triton")
    return [loss, *torch.autograd.grad(loss, (h, e))]

hs, es = spread(h), spread(e)
assert hs.stride(0) * (M - 1) >= 2**31 and es.stride(0) * (N - 1) >= 2**31
for x, y in zip(loss_and_grads(hs, es), loss_and_grads(h, e)):
    torch.testing.assert_close(x, y, atol=0, rtol=0)
"""


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
def test_offsets_past_int32():
    """Rows 2^26 elements apart (row-strided views of large, mostly untouched buffers, which the kernels take
    without a copy): element offsets pass 2^31 from row 32 on. Offsets computed in 32 bits would wrap and read
    outside the buffers, which can crash the process: the check runs in a child process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _OFFSETS_PAST_INT32], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-3000:]}"


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
def test_triton_limits_and_views():
    """Rows wider than the compiled tiles allow, and float16, raise; views the compiled kernels do not cover
    (row stride specialised unlike D, misaligned start) are copied and give the same result."""
    tl_loss = _triton_loss()
    t = torch.tensor([0, 1, 2])
    assert tl_loss.MAX_D[torch.float32] == 512
    with pytest.raises(ValueError, match="at most"):
        softmax_cross_entropy(torch.randn(3, 513), torch.randn(5, 513), t, impl="triton")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        softmax_cross_entropy(torch.randn(3, 8).half(), torch.randn(5, 8).half(), t, impl="triton")
    h, e = torch.randn(3, 16), torch.randn(5, 16)
    want = softmax_cross_entropy(h, e, t, reduction="none", impl="triton")
    wide = torch.randn(3, 24)  # row stride 24 (not a multiple of 16) under D = 16
    wide[:, :16] = h
    shifted = torch.randn(5 * 16 + 1)[1:].view(5, 16)  # 4 bytes past a 16-byte boundary
    shifted.copy_(e)
    for view, x in [(wide[:, :16], "h"), (shifted, "e")]:
        assert tl_loss._rows(view).data_ptr() != view.data_ptr()
        hh, ee = (view, e) if x == "h" else (h, view)
        got = softmax_cross_entropy(hh, ee, t, reduction="none", impl="triton")
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    big = torch.randn(5, 32)
    assert tl_loss._rows(big[:, :16]).data_ptr() == big.data_ptr()  # stride 32 and D 16: used in place
