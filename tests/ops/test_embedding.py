"""Table-batched embedding: every impl against the reference and F.embedding_bag."""
import pytest
import torch
import torch.nn.functional as F

import unirec
from unirec.nn import TableBatchedEmbedding
from unirec.ops.reference import tbe_forward_ref

from conftest import DEVICES

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float64: (1e-12, 1e-12)}


def make_batch(rows_per_table, B, D, max_bag=6, dtype=torch.float32, device="cpu", index_dtype=torch.long,
               empty_fraction=0.2, psw=False):
    """Random packed weight and feature-major bags, some empty, ids repeated."""
    T = len(rows_per_table)
    table_offsets = torch.tensor([0] + list(rows_per_table), device=device).cumsum(0)
    weight = torch.randn(int(table_offsets[-1]), D, dtype=dtype, device=device)
    lengths = torch.randint(0, max_bag + 1, (T * B,), device=device)
    lengths[torch.rand(T * B, device=device) < empty_fraction] = 0
    offsets = torch.zeros(T * B + 1, dtype=torch.long, device=device)
    offsets[1:] = lengths.cumsum(0)
    table_of_index = torch.repeat_interleave(torch.arange(T, device=device).repeat_interleave(B), lengths)
    rows = torch.tensor(rows_per_table, device=device)[table_of_index]
    # A few hot ids per table make repeated rows inside and across bags.
    indices = (torch.rand(int(offsets[-1]), device=device) ** 3 * rows).long().clamp(max=(rows - 1).clamp(min=0))
    w = torch.rand(indices.numel(), dtype=dtype, device=device) if psw else None
    return weight, table_offsets, indices.to(index_dtype), offsets.to(index_dtype), w


def linear_rows(toff, idx, off):
    """Row of weight looked up by each index position."""
    T = toff.numel() - 1
    B = (off.numel() - 1) // T
    table = torch.repeat_interleave(torch.arange(T * B, device=idx.device) // B, torch.diff(off.long()))
    return idx.long() + toff[table]


def impls(device):
    return ["auto", "cpp" if device == "cpu" else "cuda"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pooling,psw", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("D", [1, 7, 32, 64, 128, 130])
@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
def test_forward_backward_matches_reference(device, dtype, pooling, psw, D, index_dtype):
    weight, toff, idx, off, w = make_batch([5, 1, 40], B=9, D=D, dtype=dtype, device=device,
                                           index_dtype=index_dtype, psw=psw)
    # Judge low precision against a float64 reference, relative to the reference's own error.
    w64 = weight.double().requires_grad_()
    psw64 = w.double().requires_grad_() if psw else None
    ref = tbe_forward_ref(w64, toff, idx, off, psw64, pooling)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ref_lp = tbe_forward_ref(weight.float(), toff, idx, off, w.float() if psw else None, pooling).to(dtype)
    ref_err = (ref_lp.double() - ref).abs().max().item()
    for impl in impls(device):
        wt = weight.clone().requires_grad_()
        wp = w.clone().requires_grad_() if psw else None
        out = unirec.ops.table_batched_embedding(wt, toff, idx, off, wp, pooling, impl=impl)
        assert out.shape == ref.shape and out.dtype == dtype
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.double(), ref, atol=atol + 2 * ref_err, rtol=rtol)
        out.backward(grad.to(dtype))
        torch.testing.assert_close(wt.grad.double(), w64.grad, atol=atol * 4, rtol=rtol * 4)
        if psw:
            torch.testing.assert_close(wp.grad.double(), psw64.grad, atol=atol * 8 * D**0.5, rtol=rtol * 4)


CPU_ISAS = ["baseline", "avx2", "avx512"]  # each a superset of the one before


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("D", [7, 16, 32, 48, 64, 96, 128, 200])
@pytest.mark.parametrize("pooling,psw", [("sum", False), ("sum", True), ("mean", False)])
def test_cpu_isa_variants_match_reference(monkeypatch, isa, D, pooling, psw):
    """Each compiled instruction-set variant of the CPU forward, on bags long enough to prefetch."""
    # UNIREC_CPU_ISA only caps the choice: on a CPU without the ISA a narrower variant would run.
    monkeypatch.delenv("UNIREC_CPU_ISA", raising=False)
    best = unirec.build_info()["cpu_isa"]
    if CPU_ISAS.index(isa) > CPU_ISAS.index(best):
        pytest.skip(f"this CPU lacks {isa} (its widest is {best})")
    monkeypatch.setenv("UNIREC_CPU_ISA", isa)
    assert unirec.build_info()["cpu_isa"] == isa  # what tbe_forward selects, from the same cpu_isa()
    weight, toff, idx, off, w = make_batch([300, 7, 1000], B=40, D=D, max_bag=30, psw=psw)
    ref = tbe_forward_ref(weight.double(), toff, idx, off, w.double() if psw else None, pooling)
    out = unirec.ops.table_batched_embedding(weight, toff, idx, off, w, pooling, impl="cpp")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # An id outside its table is caught by every variant before any row is read.
    for position, value in [(-1, 1000), (0, -1), (idx.numel() // 2, 10**6)]:
        bad = idx.clone()
        bad[position] = value
        with pytest.raises(ValueError, match=f"= {value} is outside table"):
            unirec.ops.table_batched_embedding(weight, toff, bad, off, w, pooling, impl="cpp")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,psw", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_matches_torch(device, mode, psw):
    weight, _, idx, off, w = make_batch([50], B=17, D=24, device=device, psw=psw)
    wt, wr = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    pt = w.clone().requires_grad_() if psw else None
    pr = w.clone().requires_grad_() if psw else None
    out = unirec.ops.embedding_bag(wt, idx, off, pt, mode)
    expect = F.embedding_bag(idx, wr, off, mode=mode, per_sample_weights=pr, include_last_offset=True)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    torch.testing.assert_close(wt.grad, wr.grad, atol=1e-5, rtol=1e-5)
    if psw:
        torch.testing.assert_close(pt.grad, pr.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    # No indices at all, and a batch of zero samples.
    weight, toff, _, _, _ = make_batch([4, 3], B=1, D=5, device=device)
    idx = torch.empty(0, dtype=torch.long, device=device)
    out = unirec.ops.table_batched_embedding(weight, toff, idx, torch.zeros(7, dtype=torch.long, device=device))
    assert out.shape == (3, 2, 5) and (out == 0).all()
    out = unirec.ops.table_batched_embedding(weight, toff, idx, torch.zeros(1, dtype=torch.long, device=device))
    assert out.shape == (0, 2, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    weight, toff, idx, off, w = make_batch([3, 2], B=64, D=33, max_bag=30, device=device, psw=True)
    grads = []
    for _ in range(3):
        out = torch.ops.unirec.tbe_forward(weight, toff, idx, off, w, "sum")
        grads.append(torch.ops.unirec.tbe_backward(torch.ones_like(out), weight, toff, idx, off, w, "sum"))
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


def test_gradcheck_float64():
    weight, toff, idx, off, w = make_batch([6, 4], B=3, D=3, dtype=torch.float64, psw=True)
    for pooling, psw in [("sum", w), ("mean", None)]:
        args = (weight.clone().requires_grad_(), toff, idx, off,
                psw.clone().requires_grad_() if psw is not None else None, pooling)
        assert torch.autograd.gradcheck(lambda *a: torch.ops.unirec.tbe_forward(*a), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("psw", [False, True])
def test_opcheck(device, psw):
    weight, toff, idx, off, w = make_batch([7, 3], B=4, D=6, device=device, psw=psw)
    weight.requires_grad_()
    if psw:
        w.requires_grad_()
    torch.library.opcheck(torch.ops.unirec.tbe_forward.default, (weight, toff, idx, off, w, "sum"))
    out = torch.ops.unirec.tbe_forward(weight, toff, idx, off, w, "sum").detach()
    torch.library.opcheck(torch.ops.unirec.tbe_backward.default,
                          (torch.randn_like(out), weight.detach(), toff, idx, off,
                           w.detach() if psw else None, "sum"))
    state = torch.zeros(weight.shape[0], device=device)
    torch.library.opcheck(torch.ops.unirec.tbe_backward_update_.default,
                          (weight.detach().clone(), state, torch.randn_like(out), toff, idx, off,
                           w.detach() if psw else None, "sum", "rowwise_adagrad", 0.1, 1e-8),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_with_torch_compile():
    weight, toff, idx, off, _ = make_batch([7, 3], B=4, D=6)
    fn = torch.compile(lambda w: unirec.ops.table_batched_embedding(w, toff, idx, off).sum(), fullgraph=True,
                       backend="eager")
    assert torch.allclose(fn(weight), tbe_forward_ref(weight, toff, idx, off).sum(), atol=1e-5)


def reference_update(weight, state, toff, idx, off, psw, pooling, optimizer, lr, eps):
    """Embedding through autograd, then the optimizer step on the rows that were used."""
    w = weight.clone().requires_grad_()
    out = tbe_forward_ref(w, toff, idx, off, psw, pooling)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    g = w.grad
    used = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    used[linear_rows(toff, idx, off)] = True
    new_w, new_state = weight.clone(), state.clone()
    if optimizer == "sgd":
        p = torch.nn.Parameter(weight[used].clone())
        opt = torch.optim.SGD([p], lr=lr)
        p.grad = g[used].clone()
        opt.step()
        new_w[used] = p.detach()
    else:
        new_state[used] += (g[used] ** 2).mean(1)
        new_w[used] -= lr * g[used] / (new_state[used].sqrt()[:, None] + eps)
    return new_w, new_state, grad_out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fused_optimizer_matches_reference_update(device, optimizer, pooling):
    weight, toff, idx, off, _ = make_batch([30, 20, 10], B=16, D=12, device=device)
    state = torch.rand(weight.shape[0], device=device)
    expect_w, expect_state, grad_out = reference_update(weight, state, toff, idx, off, None, pooling, optimizer,
                                                        0.3, 1e-6)
    w, st = weight.clone(), state.clone()
    unirec.ops.tbe_backward_update_(w, st, grad_out, toff, idx, off, None, pooling, optimizer, 0.3, 1e-6)
    torch.testing.assert_close(w, expect_w, atol=1e-5, rtol=1e-5)
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(st, expect_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tables", [1, 2, 9])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
def test_fused_optimizer_any_table_count(device, tables, psw, index_dtype):
    # One table, a few, and more tables than threads: tables are split into row ranges or not.
    torch.manual_seed(tables)
    weight, toff, idx, off, w = make_batch([40 + 7 * t for t in range(tables)], B=24, D=20, device=device, psw=psw,
                                           index_dtype=index_dtype)
    state = torch.rand(weight.shape[0], device=device)
    expect_w, expect_state, grad_out = reference_update(weight, state, toff, idx, off, w, "sum", "rowwise_adagrad",
                                                        0.3, 1e-6)
    new_w, st = weight.clone(), state.clone()
    grad_psw = unirec.ops.tbe_backward_update_(new_w, st, grad_out, toff, idx, off, w, "sum", "rowwise_adagrad",
                                               0.3, 1e-6)
    torch.testing.assert_close(new_w, expect_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st, expect_state, atol=1e-5, rtol=1e-5)
    if psw:
        grad_out_flat = grad_out.transpose(0, 1).reshape(-1, weight.shape[1])  # bag t*B + b
        bag = torch.repeat_interleave(torch.arange(off.numel() - 1, device=device), torch.diff(off.long()))
        expect = (grad_out_flat[bag] * weight[linear_rows(toff, idx, off)]).sum(1)
        torch.testing.assert_close(grad_psw, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_optimizer_zero_dim_keeps_state(device, optimizer):
    # With D = 0 there is no gradient to average: the state must not become NaN.
    weight, toff, idx, off, _ = make_batch([6, 5], B=4, D=0, device=device, empty_fraction=0.0)
    state = torch.rand(weight.shape[0], device=device)
    st = state.clone()
    unirec.ops.tbe_backward_update_(weight, st, torch.zeros(4, 2, 0, device=device), toff, idx, off, None, "sum",
                                    optimizer, 0.1)
    assert torch.equal(st, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", [None, "sgd", "rowwise_adagrad"])
def test_module_trains(device, optimizer):
    torch.manual_seed(0)
    m = TableBatchedEmbedding([100, 50], dim=8, optimizer=optimizer, lr=0.5, device=device)
    _, _, idx, off, _ = make_batch([100, 50], B=32, D=8, device=device)
    target = torch.randn(32, 2, 8, device=device)
    before = m.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.5) if optimizer is None else None
    losses = []
    for _ in range(20):
        loss = ((m(idx, off) - target) ** 2).mean()
        losses.append(loss.item())
        if opt:
            opt.zero_grad()
        loss.backward()
        if opt:
            opt.step()
    assert losses[-1] < 0.8 * losses[0]
    if optimizer is not None:
        assert list(m.parameters()) == []
        assert m.weight.grad is None
        unused = torch.ones(150, dtype=torch.bool, device=device)
        unused[linear_rows(m.table_offsets, idx, off)] = False
        assert torch.equal(m.weight[unused], before[unused])  # untouched rows stay


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device):
    weight, toff, idx, off, w = make_batch([5, 4], B=3, D=4, device=device, empty_fraction=0.0, psw=True)
    tbe = unirec.ops.table_batched_embedding

    def raises(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            tbe(*args, **kw)

    bad = idx.clone()
    bad[-1] = 4  # table 1 has 4 rows: valid ids are 0..3
    raises(r"indices\[\d+\] = 4 is outside table 1", weight, toff, bad, off)
    bad[-1] = -1
    raises(r"outside table 1", weight, toff, bad, off)
    bad_off = off.clone()
    bad_off[2] = int(bad_off[3]) + 1
    raises("offsets must not decrease", weight, toff, idx, bad_off)
    raises(r"offsets\[-1\] must equal len\(indices\)", weight, toff, idx[:-1], off)
    raises("offsets must have T\\*B\\+1 entries", weight, toff, idx, off[:-1])
    raises("table_offsets\\[-1\\] must equal the rows of weight", weight[:-1], toff, idx, off)
    raises("weight must be float32", weight.long(), toff, idx, off)
    raises("indices must be int64 or int32", weight, toff, idx.float(), off)
    raises("offsets must have the dtype of indices", weight, toff, idx, off.int())
    raises("per_sample_weights must have one weight per index", weight, toff, idx, off, w[:-1])
    raises("per_sample_weights must have the dtype of weight", weight, toff, idx, off, w.double())
    raises("per_sample_weights are only supported with pooling=\"sum\"", weight, toff, idx, off, w, "mean")
    raises("pooling must be", weight, toff, idx, off, None, "max")
    with pytest.raises(ValueError, match="impl must be one of"):
        tbe(weight, toff, idx, off, impl="fast")
    if device == "cuda":
        raises("indices is on cpu but weight is on cuda", weight, toff, idx.cpu(), off)


def test_bad_optimizer_state_raises():
    weight, toff, idx, off, _ = make_batch([5, 4], B=3, D=4)
    out = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="optimizer_state must have one entry per row"):
        unirec.ops.tbe_backward_update_(weight, torch.zeros(3), out, toff, idx, off, None, "sum",
                                        "rowwise_adagrad", 0.1)
    with pytest.raises(ValueError, match="optimizer must be"):
        unirec.ops.tbe_backward_update_(weight, torch.zeros(9), out, toff, idx, off, None, "sum", "adam", 0.1)


def test_build_info():
    info = unirec.build_info()
    assert "cpu" in info["backends"] and info["threads"] >= 1


def test_empty_table():
    table = unirec.ops.empty_table(300_000, 16, dtype=torch.bfloat16)  # 9.6 MB
    assert table.shape == (300_000, 16) and table.dtype == torch.bfloat16 and table.is_contiguous()
    big = unirec.ops.empty_table(300_000, 64)  # 77 MB: whole 2 MiB pages inside get the advice
    assert big.normal_().isfinite().all()
    assert not unirec._C.advise_huge_pages(table.data_ptr(), 1 << 20)  # under 16 MiB: left alone
    assert unirec.ops.empty_table(0, 8).shape == (0, 8)
