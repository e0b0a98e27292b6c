"""jagged_attention: every impl against the padded reference, forward and backward."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import unirec  # noqa: F401,E402
from unirec.ops import jagged_attention  # noqa: E402
from unirec.ops.reference import jagged_attention_ref  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def impls_for(device):
    """Triton runs on CPU tensors only under the interpreter (set when there is no GPU)."""
    if device == "cpu":
        return ["cpp", "triton", "reference"] if INTERPRET else ["cpp", "reference"]
    return ["auto", "triton", "reference"]


def make(lengths, H, D, max_seqlen, dtype=torch.float32, device="cpu", targets=None, bias=False):
    lengths = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, dtype=dtype, device=device) for _ in range(3))
    nt = torch.tensor(targets, dtype=torch.long, device=device) if targets is not None else None
    rb = torch.randn(H, max_seqlen, dtype=dtype, device=device) * 0.5 if bias else None
    return q, k, v, offsets.to(device), nt, rb


def run(impl, q, k, v, off, N, nt, rb, grad, **kw):
    """Output and the gradients of q, k, v (and rel_bias), in float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rbl = rb.detach().clone().requires_grad_() if rb is not None else None
    out = jagged_attention(*leaves, off, N, num_targets=nt, rel_bias=rbl, impl=impl, **kw)
    out.backward(grad.to(out.dtype))
    res = [out] + [t.grad for t in leaves] + ([rbl.grad] if rbl is not None else [])
    return [r.double() for r in res]


LENGTHS = [0, 1, 70, 37, 5, 64]   # 0, 1 and max_seqlen in one batch
TARGETS = [0, 1, 4, 9, 5, 0]
N = 70


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("targets", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, activation, causal, targets, bias):
    H, D = 3, 24
    q, k, v, off, nt, rb = make(LENGTHS, H, D, N, device=device, targets=TARGETS if targets else None, bias=bias)
    g = torch.randn_like(q)
    kw = dict(causal=causal, activation=activation)
    want = run("reference", q.double(), k.double(), v.double(), off, N, nt, rb.double() if bias else None, g, **kw)
    for impl in impls_for(device):
        got = run(impl, q, k, v, off, N, nt, rb, g, **kw)
        for name, a, b in zip(["out", "dq", "dk", "dv", "drel_bias"], got, want):
            scale = b.abs().max().item() + 1e-6
            assert (a - b).abs().max().item() <= 2e-5 * scale + 1e-6, f"{impl} {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [16, 24, 32, 40, 48, 64, 96])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])  # each compiled variant (capped by the CPU's)
def test_head_dims(monkeypatch, device, D, activation, isa):
    if isa != "avx512":  # avx512: the best the CPU has
        if device != "cpu":
            pytest.skip("UNIREC_CPU_ISA applies to the CPU kernels")
        monkeypatch.setenv("UNIREC_CPU_ISA", isa)
    H = 5  # not a power of two
    q, k, v, off, nt, rb = make([3, 0, 150, 130, 1], H, D, 150, device=device, targets=[1, 0, 3, 0, 0], bias=True)
    g = torch.randn_like(q)
    want = run("reference", q.double(), k.double(), v.double(), off, 150, nt, rb.double(), g, activation=activation)
    impls = impls_for(device) if (device == "cuda" or D in (16, 64)) else ["cpp", "reference"]
    for impl in impls:
        got = run(impl, q, k, v, off, 150, nt, rb, g, activation=activation)
        for name, a, b in zip(["out", "dq", "dk", "dv", "drel_bias"], got, want):
            scale = b.abs().max().item() + 1e-6
            assert (a - b).abs().max().item() <= 2e-5 * scale + 1e-6, f"{impl} D={D} {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_bfloat16_against_float64(device, activation):
    """bf16 error of each impl at most a small multiple of the reference's own bf16 error."""
    H, D = 2, 32
    q, k, v, off, nt, rb = make([50, 1, 96, 0, 33], H, D, 96, device=device, targets=[3, 0, 5, 0, 0], bias=True)
    g = torch.randn_like(q)
    want = run("reference", q.double(), k.double(), v.double(), off, 96, nt, rb.double(), g, activation=activation)
    args = [t.bfloat16() for t in (q, k, v)]
    ref_bf16 = run("reference", *args, off, 96, nt, rb.bfloat16(), g, activation=activation)
    impls = [i for i in impls_for(device) if i != "reference"]
    for impl in impls:
        got = run(impl, *args, off, 96, nt, rb.bfloat16(), g, activation=activation)
        for name, a, r, w in zip(["out", "dq", "dk", "dv", "drel_bias"], got, ref_bf16, want):
            ref_err = (r - w).abs().max().item()
            err = (a - w).abs().max().item()
            assert err <= 3 * ref_err + 1e-3 * w.abs().max().item(), f"{impl} {name}: {err} vs reference {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_targets_do_not_see_each_other(device, activation):
    H, D = 2, 16
    q, k, v, off, nt, _ = make([20, 12], H, D, 20, device=device, targets=[4, 3])
    for impl in impls_for(device):
        out = jagged_attention(q, k, v, off, 20, num_targets=nt, activation=activation, impl=impl)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[17] += 3.0  # target 17 of sequence 0 (targets are 16..19)
        out2 = jagged_attention(q2, k2, v2, off, 20, num_targets=nt, activation=activation, impl=impl)
        others = [16, 18, 19] + list(range(20, 32))
        assert torch.equal(out[others], out2[others]), impl
        assert not torch.equal(out[17], out2[17]), impl
        # non-targets do not see targets either
        assert torch.equal(out[:16], out2[:16]), impl


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_empty(device, lengths):
    q, k, v, off, _, _ = make(lengths, 2, 16, 8, device=device)
    for impl in impls_for(device):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = jagged_attention(*leaves, off, 8, impl=impl)
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        assert leaves[0].grad.shape == (0, 2, 16)


@pytest.fixture
def poison_empty():
    """torch.empty and friends (in Python and in C++ kernels alike) return NaN-filled memory."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_poisoned_outputs_fully_written(device, activation, poison_empty):
    """Every element of the output and of the gradients is written: none keeps the NaN of its allocation."""
    assert torch.empty(4).isnan().all()
    q, k, v, off, nt, rb = make([7, 0, 33, 1], 2, 16, 33, device=device, targets=[2, 0, 1, 1], bias=True)
    g = torch.randn_like(q)
    for impl in impls_for(device):
        got = run(impl, q, k, v, off, 33, nt, rb, g, activation=activation)
        for name, t in zip(["out", "dq", "dk", "dv", "drel_bias"], got):
            assert not t.isnan().any(), f"{impl} {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_opcheck(device, activation):
    q, k, v, off, nt, rb = make([5, 0, 9], 2, 16, 9, device=device, targets=[1, 0, 2], bias=True)
    if device == "cpu":
        q, k, v, rb = q.double(), k.double(), v.double(), rb.double()
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), off, 9, True, nt, activation,
            rb.requires_grad_(), 0.25)
    torch.library.opcheck(torch.ops.unirec.jagged_attention_fwd.default, args)
    out, lse = torch.ops.unirec.jagged_attention_fwd(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), off, 9, True, nt,
             activation, rb.detach(), 0.25)
    torch.library.opcheck(torch.ops.unirec.jagged_attention_bwd.default, bargs)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(activation, causal):
    q, k, v, off, nt, rb = make([4, 0, 7, 1], 2, 8, 7, dtype=torch.float64, targets=[1, 0, 2, 1], bias=True)
    inputs = [t.requires_grad_() for t in (q, k, v, rb)]

    def f(q, k, v, rb):
        return jagged_attention(q, k, v, off, 7, causal=causal, num_targets=nt, activation=activation, rel_bias=rb,
                                impl="cpp")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["cpp_or_auto", "triton"])
def test_bad_inputs(device, impl):
    if impl == "cpp_or_auto":
        impl = "cpp" if device == "cpu" else "auto"
    elif device == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    q, k, v, off, nt, rb = make([3, 4], 2, 16, 4, device=device)
    T = q.shape[0]

    def call(q=q, k=k, v=v, off=off, N=4, **kw):
        return jagged_attention(q, k, v, off, N, impl=impl, **kw)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    with pytest.raises(ValueError, match="offsets"):
        call(off=t([1, 3, T]))
    with pytest.raises(ValueError, match="offsets"):
        call(off=t([0, 3, T - 1]))
    with pytest.raises(ValueError, match="offsets"):
        call(off=t([0, 5, T - 3]))
    with pytest.raises(ValueError, match="max_seqlen"):
        call(off=t([0, 1, T]), N=4)
    with pytest.raises(ValueError, match="num_targets"):
        call(num_targets=t([4, 0]))
    with pytest.raises(ValueError, match="num_targets"):
        call(num_targets=t([0]))
    with pytest.raises(ValueError, match="k must have q's shape"):
        call(k=k[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        call(v=v.double())
    with pytest.raises(ValueError, match="rel_bias"):
        call(rel_bias=torch.zeros(2, 3, device=device))
    with pytest.raises(ValueError, match="activation"):
        call(activation="relu")
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            call(k=k.cpu())


def test_default_scale_and_impl_errors():
    q, k, v, off, _, _ = make([5], 1, 16, 5)
    a = jagged_attention(q, k, v, off, 5)
    b = jagged_attention(q, k, v, off, 5, scale=1 / math.sqrt(16))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="impl"):
        jagged_attention(q, k, v, off, 5, impl="cuda")
    with pytest.raises(ValueError, match="activation"):
        jagged_attention_ref(q, k, v, off, 5, activation="tanh")  # noqa


def _triton_attention():
    pytest.importorskip("triton")
    from unirec.ops.triton import attention

    return attention


def test_launch_grid_within_cuda_limits():
    """B * H is not bound by CUDA's 65535 limit of grid axes 1 and 2: one 1-D axis holds all programs."""
    ta = _triton_attention()
    B, H, max_seqlen = 200_000, 16, 1000  # B * H = 3.2M
    for dtype, D in [(torch.bfloat16, 64), (torch.float32, 128)]:
        for kernel in ta.KERNELS:
            bm, bn, _, _ = ta.gpu_blocks(kernel, D, dtype)
            block = bn if kernel == "dkdv" else bm
            g = ta.grid(max_seqlen, block, B, H)
            assert len(g) == 1 and g[0] < 2**31, (kernel, g)
            assert g[0] == math.ceil(max_seqlen / block) * B * H
    with pytest.raises(ValueError, match="2\\^31"):
        ta.grid(2**20, 16, 2**20, 16)


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
@pytest.mark.parametrize("dtype,D,activation,causal", [
    (torch.bfloat16, 64, "softmax", True),   # the 16-bit tiles: fwd 128x64, dk/dv 32x128, dq 128x32
    (torch.bfloat16, 64, "silu", False),
    (torch.float32, 40, "softmax", False),  # the others: 64x32, 32x64, 64x32
    (torch.float32, 40, "silu", True),
], ids=["bf16-64-softmax-causal", "bf16-64-silu", "f32-40-softmax", "f32-40-silu-causal"])
def test_gpu_tiles_in_interpreter(monkeypatch, dtype, D, activation, causal):
    """The tile sizes the GPU selects, on sequences of several tiles with odd remainders, against float64."""
    ta = _triton_attention()
    monkeypatch.setattr(ta, "GPU_TILES", True)
    lengths, n = [300, 0, 129, 1, 77], 300
    q, k, v, off, nt, rb = make(lengths, 2, D, n, targets=[7, 0, 1, 1, 0], bias=True)
    q, k, v, rb = (t.to(dtype) for t in (q, k, v, rb))
    assert [ta._blocks(q, kn) for kn in ta.KERNELS] == [ta.gpu_blocks(kn, D, dtype) for kn in ta.KERNELS]
    g = torch.randn(q.shape)
    kw = dict(causal=causal, activation=activation)
    want = run("reference", q.double(), k.double(), v.double(), off, n, nt, rb.double(), g, **kw)
    got = run("triton", q, k, v, off, n, nt, rb, g, **kw)
    ref = run("reference", q, k, v, off, n, nt, rb, g, **kw) if dtype == torch.bfloat16 else None
    for i, name in enumerate(["out", "dq", "dk", "dv", "drel_bias"]):
        err = (got[i] - want[i]).abs().max().item()
        scale = want[i].abs().max().item()
        if ref is None:
            assert err <= 2e-5 * scale + 1e-6, name
        else:
            # sequences of several GPU tiles sum hundreds of bfloat16-rounded terms per gradient element: allow
            # one bfloat16 ulp of the largest element on top of the reference's own error
            ref_err = (ref[i] - want[i]).abs().max().item()
            assert err <= 3 * ref_err + 2**-7 * scale, f"{name}: {err} vs reference {ref_err}"


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the interpreter")
def test_triton_limits():
    """Head dims past the compiled-and-checked maximum, 32-bit offsets within a sequence and dtypes without
    compiled kernels raise clearly."""
    ta = _triton_attention()
    q, k, v, off, _, _ = make([3], 1, ta.MAX_HEAD_DIM + 1, 3)
    with pytest.raises(ValueError, match="head dims"):
        jagged_attention(q, k, v, off, 3, impl="triton")
    q, k, v, off, _, _ = make([3], 2, 16, 3)
    with pytest.raises(ValueError, match="2\\^31"):
        jagged_attention(q, k, v, off, 2**26, impl="triton")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        jagged_attention(q.half(), k.half(), v.half(), off, 3, impl="triton")
