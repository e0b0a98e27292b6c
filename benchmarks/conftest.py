"""Shared benchmark machinery: device choice, rooflines, timing, memory.

Every benchmark goes through ``measure`` so that timings sync the GPU, the
providers of one shape share a pytest-benchmark group, and extra_info carries
the achieved rate and its fraction of this machine's measured ceiling.

    UNIREC_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-only   # GPU shapes
"""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def bench_device() -> str:
    dev = os.environ.get("UNIREC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("UNIREC_BENCH_DEVICE=cuda but no CUDA GPU")
    return dev


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


_CEILINGS = {}


def copy_bandwidth(device: str) -> float:
    """Measured copy bandwidth in bytes/s: read + write of a tensor far larger than the caches."""
    key = ("copy", device)
    if key not in _CEILINGS:
        n = (2 << 30 if device == "cuda" else 256 << 20) // 4
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        t = _median_time(lambda: dst.copy_(src), device, 10)
        _CEILINGS[key] = 2 * src.numel() * 4 / t
    return _CEILINGS[key]


def matmul_rate(device: str, dtype=None) -> float:
    """Measured dense matmul rate in FLOP/s (bfloat16 on GPU, float32 on CPU by default)."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    key = ("mm", device, dtype)
    if key not in _CEILINGS:
        n = 8192 if device == "cuda" else 2048
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        t = _median_time(lambda: a @ b, device, 10 if device == "cuda" else 5)
        _CEILINGS[key] = 2 * n**3 / t
    return _CEILINGS[key]


def measure(benchmark, fn, *, device: str, group: str, provider: str, bytes_moved=None, flops=None,
            rounds=None, **info):
    """Time ``fn`` with pytest-benchmark (GPU synchronised) and record rates in extra_info.

    bytes_moved: bytes the op must read and write (roofline against copy bandwidth).
    flops: useful floating-point operations (roofline against the matmul rate).
    """
    benchmark.group = group
    benchmark.name = provider

    def timed():
        fn()
        sync(device)

    start = time.perf_counter()
    timed()  # first call: compilation, caches
    first = time.perf_counter() - start
    # The allocator needs a few calls to settle: a fresh large output or
    # gradient costs page faults (and huge-page compaction) at first, which
    # is not the steady state of a training loop. Millisecond calls also get
    # more rounds, for a stable median.
    if rounds is None:
        rounds = 30 if device == "cuda" or first < 0.05 else 7
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=5 if first < 0.5 else 1)
    median = benchmark.stats.stats.median
    extra = {"provider": provider, "device": device, "median_ms": round(median * 1e3, 4)}
    if bytes_moved is not None:
        ceiling = copy_bandwidth(device)
        extra.update(gb_per_s=round(bytes_moved / median / 1e9, 2), copy_gb_per_s=round(ceiling / 1e9, 2),
                     roofline_fraction=round(bytes_moved / median / ceiling, 3))
    if flops is not None:
        ceiling = matmul_rate(device)
        extra.update(gflop_per_s=round(flops / median / 1e9, 2), matmul_gflop_per_s=round(ceiling / 1e9, 2),
                     roofline_fraction_flops=round(flops / median / ceiling, 3))
    if device == "cuda":
        extra["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    extra.update(info)
    benchmark.extra_info.update(extra)
    return median


@pytest.fixture
def device():
    return bench_device()
