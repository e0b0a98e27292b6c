"""Shared benchmark machinery: device choice, rooflines, timing, memory, records.

Every benchmark goes through ``measure`` so that timings sync the GPU, the
providers of one shape share a pytest-benchmark group, and extra_info carries
the achieved rate and its fraction of this machine's measured ceiling.

Each timed benchmark (and each provider skipped as unsupported) appends one
JSON line to the machine's record file, benchmarks/results/<machine>.jsonl:
op, group, provider, shape, median, min and max of at least MIN_ROUNDS timed
rounds, rate and roofline fraction, CPU model and ISA, load average, torch
version, git commit, date and the command. ``python benchmarks/report.py
tables`` makes the README and RESULTS tables from them. Environment:
UNIREC_BENCH_RECORDS (another file, or "off"), UNIREC_BENCH_MACHINE (the
machine tag), UNIREC_BENCH_RUN_ID and UNIREC_BENCH_COMMAND (set by
``report.py measure``).

    UNIREC_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-only   # GPU shapes
"""
import datetime
import functools
import json
import os
import re
import shlex
import subprocess
import sys
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


# A figure is a median with its range over at least this many timed rounds;
# one favourable round proves nothing on a shared machine.
MIN_ROUNDS = 5
HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ID = os.environ.get("UNIREC_BENCH_RUN_ID") or datetime.datetime.now().strftime("%Y%m%dT%H%M%S")


def provider_kind(provider: str) -> str:
    """unirec | reference | peer (another library) | stock (PyTorch as a user would write it)."""
    if provider.startswith("fbgemm"):
        return "peer"
    if "reference" in provider:
        return "reference"
    if provider in ("unirec", "cpp", "cuda", "triton") or provider.startswith("unirec"):
        return "unirec"
    return "stock"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def machine_info(device: str) -> dict:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"
    info = {"cpu": model, "cores": os.cpu_count(), "cpu_flags": isa,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}
    try:
        import unirec
        info["unirec_cpu_isa"] = unirec.build_info().get("cpu_isa")
    except Exception:  # a record without it is still a record
        pass
    tag = f"cpu-{_slug(model or 'unknown')}-{os.cpu_count()}c"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        tag = f"cuda-{_slug(info['gpu'])}"
    info["machine"] = os.environ.get("UNIREC_BENCH_MACHINE", tag)
    return info


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def records_path(device: str):
    """The record file of this machine, or None when records are off."""
    path = os.environ.get("UNIREC_BENCH_RECORDS", "")
    if path.lower() in ("off", "0", "none"):
        return None
    return path or os.path.join(HERE, "results", machine_info(device)["machine"] + ".jsonl")


# The op each benchmark file measures (a record names it; the group names the shape).
OPS = {"bench_embedding": "table_batched_embedding", "bench_attention": "jagged_attention",
       "bench_retrieval": "topk_scores", "bench_loss": "softmax_cross_entropy", "bench_dropout": "dropout",
       "bench_train": "train_epoch"}


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]


def write_record(*, device: str, group: str, provider: str, params: dict, status: str = "ok", kind=None,
                 **fields) -> dict:
    test = _current_test()
    module = os.path.splitext(os.path.basename(test.split("::")[0]))[0]
    versions = {"torch": torch.__version__}
    for lib in ("fbgemm_gpu", "triton"):
        if lib in sys.modules:
            versions[lib] = getattr(sys.modules[lib], "__version__", "unknown")
    rec = {"run_id": RUN_ID, "time": datetime.datetime.now().isoformat(timespec="seconds"),
           "op": OPS.get(module, module), "group": group, "provider": provider,
           "kind": kind or provider_kind(provider), "status": status, "device": device, "params": params,
           **fields, "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
           "versions": versions, "torch_threads": torch.get_num_threads(), "commit": git_commit(),
           **machine_info(device), "test": test,
           "command": os.environ.get("UNIREC_BENCH_COMMAND") or shlex.join(["python", "-m", "pytest",
                                                                              *sys.argv[1:]])}
    path = records_path(device)
    if path is None:
        return rec
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def unsupported(benchmark, *, device: str, group: str, provider: str, reason: str, params=None):
    """Skip a provider that cannot run this case; the record says so, so that the table can too."""
    if not benchmark.disabled:
        write_record(device=device, group=group, provider=provider, params=params or {}, status="unsupported",
                     reason=reason)
    pytest.skip(reason)


def measure(benchmark, fn, *, device: str, group: str, provider: str, bytes_moved=None, flops=None,
            rounds=None, params=None, kind=None, **info):
    """Time ``fn`` with pytest-benchmark (GPU synchronised), record rates in extra_info and
    append the record (see the module doc). Returns the median in seconds (None when
    pytest-benchmark is disabled: fn then ran once, as a test).

    bytes_moved: bytes the op must read and write (roofline against copy bandwidth).
    flops: useful floating-point operations (roofline against the matmul rate).
    rounds: timed rounds, never fewer than MIN_ROUNDS.
    params: the shape, for the record (the group name says it for humans).
    """
    benchmark.group = group
    benchmark.name = provider
    if benchmark.disabled:
        benchmark(fn)
        return None

    def timed():
        fn()
        sync(device)

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    timed()  # first call: compilation, caches
    first = time.perf_counter() - start
    # The allocator needs a few calls to settle: a fresh large output or
    # gradient costs page faults (and huge-page compaction) at first, which
    # is not the steady state of a training loop. Millisecond calls also get
    # more rounds, for a stable median.
    if rounds is None:
        rounds = 30 if device == "cuda" or first < 0.05 else 7
    rounds = max(rounds, MIN_ROUNDS)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=5 if first < 0.5 else 1)
    st = benchmark.stats.stats
    median = st.median
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
    rate = {k: extra[k] for k in ("gb_per_s", "copy_gb_per_s", "gflop_per_s", "matmul_gflop_per_s") if k in extra}
    frac = extra.get("roofline_fraction", extra.get("roofline_fraction_flops"))
    write_record(device=device, group=group, provider=provider, params=params or {}, kind=kind,
                 median_ms=median * 1e3, min_ms=st.min * 1e3, max_ms=st.max * 1e3, rounds=st.rounds,
                 rate=rate, roofline_fraction=frac, load_avg_1m_before=round(load_before, 2),
                 extra={k: v for k, v in info.items()})
    return median


@pytest.fixture
def device():
    return bench_device()
