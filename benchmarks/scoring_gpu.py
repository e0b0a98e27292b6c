"""The retrieval and loss benchmarks on a GPU without pytest-benchmark (the
GPU machine may lack it): same providers and shapes as bench_retrieval.py and
bench_loss.py, medians over repeats, peak memory beyond inputs in a fresh
process, one markdown table.

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/scoring_gpu.py [--quick]
"""
import sys
import time

import torch

import bench_loss
import bench_retrieval
from peak_memory import peak_delta_mb


def median_ms(fn, repeat):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    quick = "--quick" in sys.argv
    rows = []
    for shape in bench_retrieval.GPU_SHAPES[: 1 if quick else None]:
        for p in ["cuda", "matmul_mask_topk", "chunked_matmul_topk", "reference"]:
            fn, _ = bench_retrieval.case(p, *shape, device="cuda")
            ms = median_ms(fn, 10)
            del fn
            torch.cuda.empty_cache()
            peak = peak_delta_mb("bench_retrieval", "case", p, *shape, device="cuda")
            rows.append((f"topk_scores B={shape[0]} N={shape[1]} D={shape[2]} k=100 {shape[3]}", p, ms, peak))
            print(rows[-1], flush=True)
    for shape in bench_loss.GPU_SHAPES:
        for p in ["triton", "materialised"]:
            fn, _ = bench_loss.case(p, *shape, device="cuda")
            ms = median_ms(fn, 5)
            del fn
            torch.cuda.empty_cache()
            peak = peak_delta_mb("bench_loss", "case", p, *shape, device="cuda")
            rows.append((f"softmax_ce fwd+bwd M={shape[0]} N={shape[1]} D={shape[2]} {shape[3]}", p, ms, peak))
            print(rows[-1], flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| group | provider | median ms | vs slowest | peak MB beyond inputs |")
    print("|---|---|---|---|---|")
    for group in dict.fromkeys(r[0] for r in rows):
        rs = [r for r in rows if r[0] == group]
        slow = max(r[2] for r in rs)
        for r in sorted(rs, key=lambda r: r[2]):
            print(f"| {group} | {r[1]} | {r[2]:.2f} | {slow / r[2]:.2f}x | {r[3]} |")


if __name__ == "__main__":
    main()
