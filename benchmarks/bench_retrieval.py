"""topk_scores: unirec kernels against the reference and stock PyTorch.

CPU (the issue's shapes): B=256, D=64, k=100, N in {1e5, 1e6}, 50 excluded
ids per query. GPU: B=1024, D=128, k=100, N=1e6, float32 and bfloat16.
Providers: unirec's compiled kernel ("cpp" / "cuda"), unirec's reference,
"matmul_mask_topk" (the naive stock way: the full [B, N] scores, excluded
set to -inf, torch.topk) and "chunked_matmul_topk" (the best stock way:
matmul and topk per chunk of CHUNK items, merged, never B x N). The README's
stock column is the faster of the two stock providers, named in the cell.
peak_rss_mb / peak_extra_mb: memory beyond the inputs, measured in a fresh
process (benchmarks/peak_memory.py).

    PYTHONPATH=$PWD python -m pytest benchmarks/bench_retrieval.py --benchmark-only
"""
import pytest
import torch

import unirec  # noqa: F401
from conftest import bench_device, measure
from peak_memory import peak_delta_mb
from unirec.ops import topk_scores
from unirec.ops.reference import topk_scores_ref

K = 100
N_EXCLUDED = 50
CHUNK = 65536


def _matmul_mask_topk(q, items, k, off, ids):
    scores = q @ items.T
    rows = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), off[1:] - off[:-1])
    scores[rows, ids] = float("-inf")
    return torch.topk(scores, k, dim=1)


def _chunked_matmul_topk(q, items, k, off, ids):
    B, N = q.shape[0], items.shape[0]
    rows = torch.repeat_interleave(torch.arange(B, device=q.device), off[1:] - off[:-1])
    best_v = torch.full((B, 0), float("-inf"), device=q.device, dtype=q.dtype)
    best_i = torch.zeros((B, 0), device=q.device, dtype=torch.long)
    for c0 in range(0, N, CHUNK):
        s = q @ items[c0:c0 + CHUNK].T
        sel = (ids >= c0) & (ids < c0 + CHUNK)
        s[rows[sel], ids[sel] - c0] = float("-inf")
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        v, j = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + c0], 1).gather(1, j)
        best_v = v
    return best_v, best_i


def case(provider, B, N, D, dtype, device="cpu"):
    """(fn, inputs) of one provider at one shape; also used by peak_memory.py in a fresh process."""
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q = torch.randn(B, D, generator=gen).to(device=device, dtype=dt)
    items = torch.randn(N, D, generator=gen).to(device=device, dtype=dt)
    off = torch.arange(0, (B + 1) * N_EXCLUDED, N_EXCLUDED).to(device)
    ids = torch.randint(0, N, (B * N_EXCLUDED,), generator=gen).to(device)
    fns = {
        "cpp": lambda: topk_scores(q, items, K, exclude_offsets=off, exclude_indices=ids, impl="cpp"),
        "cuda": lambda: topk_scores(q, items, K, exclude_offsets=off, exclude_indices=ids, impl="cuda"),
        "reference": lambda: topk_scores_ref(q, items, K, None, off, ids),
        "matmul_mask_topk": lambda: _matmul_mask_topk(q, items, K, off, ids),
        "chunked_matmul_topk": lambda: _chunked_matmul_topk(q, items, K, off, ids),
    }
    return fns[provider], (q, items, off, ids)


CPU_SHAPES = [(256, 100_000, 64, "float32"), (256, 1_000_000, 64, "float32")]
GPU_SHAPES = [(1024, 1_000_000, 128, "bfloat16"), (1024, 1_000_000, 128, "float32")]


def _shapes():
    return GPU_SHAPES if bench_device() == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"B{s[0]}-N{s[1]}-D{s[2]}-{s[3]}")
@pytest.mark.parametrize("provider", ["unirec", "reference", "matmul_mask_topk", "chunked_matmul_topk"])
def test_topk_scores(benchmark, device, shape, provider):
    B, N, D, dtype = shape
    name = {"unirec": "cpp" if device == "cpu" else "cuda"}.get(provider, provider)
    if name == "reference" and N >= 1_000_000 and device == "cpu":
        pytest.skip("the reference's int64 keys over B x N take minutes on 2 cores")
    fn, _ = case(name, B, N, D, dtype, device=device)
    flops = 2 * B * N * D
    peak = peak_delta_mb("bench_retrieval", "case", name, B, N, D, dtype, device=device)
    scores_mb = B * N * 4 / 2**20
    info = {"peak_extra_mb": peak, "scores_fp32_mb": round(scores_mb, 1)}
    if device == "cpu":
        info["peak_rss_mb"] = peak
    if peak is not None:
        info["peak_vs_scores"] = round(peak / scores_mb, 4)
    measure(benchmark, fn, device=device, group=f"topk_scores B={B} N={N} D={D} k={K} {dtype}", provider=name,
            flops=flops, rounds=5 if device == "cpu" else 20,
            params=dict(B=B, N=N, D=D, k=K, excluded_per_query=N_EXCLUDED, dtype=dtype), **info)
