"""softmax_cross_entropy forward + backward: unirec kernels against materialised logits.

CPU (the issue's shape): M=4096, D=64, N=1e5, float32. GPU: M=8192, D=256,
N=1e6, bfloat16. Providers: unirec's compiled kernel ("cpp" on CPU, "triton"
on CUDA) and "materialised" (logits = hidden @ items.T + bias, then
F.cross_entropy, the stock way; the reference computes the same in float32).
peak_rss_mb / peak_extra_mb: memory beyond the inputs, measured in a fresh
process (benchmarks/peak_memory.py).

    PYTHONPATH=$PWD python -m pytest benchmarks/bench_loss.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import unirec  # noqa: F401
from conftest import bench_device, measure
from peak_memory import peak_delta_mb
from unirec.ops import softmax_cross_entropy


def case(provider, M, N, D, dtype, device="cpu"):
    """(fn, inputs) of one provider at one shape; also used by peak_memory.py in a fresh process."""
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(M, D, generator=gen) / D**0.5).to(device=device, dtype=dt).requires_grad_()
    e = (torch.randn(N, D, generator=gen) / D**0.25).to(device=device, dtype=dt).requires_grad_()
    b = torch.zeros(N, dtype=dt, device=device).requires_grad_()
    t = torch.randint(0, N, (M,), generator=gen).to(device)

    def run_unirec():
        impl = "cpp" if device == "cpu" else "auto"
        loss = softmax_cross_entropy(h, e, t, item_bias=b, impl=impl)
        return torch.autograd.grad(loss, (h, e, b))

    def run_materialised():
        loss = F.cross_entropy(torch.addmm(b, h, e.T), t)
        return torch.autograd.grad(loss, (h, e, b))

    fns = {"cpp": run_unirec, "triton": run_unirec, "materialised": run_materialised}
    return fns[provider], (h, e, b, t)


# The shape (the catalogue too large to keep [M, N]: the backward recomputes the logits), and
# one step of the MovieLens-100K model (kept logit gradient: three GEMMs in all).
CPU_SHAPES = [(4096, 100_000, 64, "float32"), (2700, 1682, 96, "float32")]
GPU_SHAPES = [(8192, 1_000_000, 256, "bfloat16")]


def _shapes():
    return GPU_SHAPES if bench_device() == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"M{s[0]}-N{s[1]}-D{s[2]}-{s[3]}")
@pytest.mark.parametrize("provider", ["unirec", "materialised"])
def test_softmax_cross_entropy_fwd_bwd(benchmark, device, shape, provider):
    M, N, D, dtype = shape
    name = {"unirec": "cpp" if device == "cpu" else "triton"}.get(provider, provider)
    fn, _ = case(name, M, N, D, dtype, device=device)
    peak = peak_delta_mb("bench_loss", "case", name, M, N, D, dtype, device=device)
    info = {"peak_extra_mb": peak, "logits_mb": round(M * N * torch.tensor([], dtype=getattr(torch, dtype))
                                                      .element_size() / 2**20, 1)}
    if device == "cpu":
        info["peak_rss_mb"] = peak
    # Useful work: the three GEMMs of forward + backward (the logits, dhidden, ditems).
    measure(benchmark, fn, device=device, group=f"softmax_ce fwd+bwd M={M} N={N} D={D} {dtype}", provider=name,
            flops=3 * 2 * M * N * D, rounds=5 if device == "cpu" else 10, params=dict(M=M, N=N, D=D, dtype=dtype),
            **info)
