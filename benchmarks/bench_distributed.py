"""Distributed training on this machine: data-parallel throughput and quality, sharded-loss memory.

    python benchmarks/bench_distributed.py [--epochs 20] [--skip-train] [--skip-memory]

1. ``unirec train`` on MovieLens-100K (the default preset, seed 0, global batch 64) as one process
   with 2 threads and as ``torchrun --nproc_per_node=2`` with 1 thread each: training users/s (the
   mean over epochs of the training windows of the global batch per second) and the test NDCG@10
   of each run (the issue's target: within 0.01).
2. Peak memory per process of the retrieval loss (forward + backward) over a catalogue of 10^6
   items (D = 64, M = 1024 rows): the unsharded op in one process against
   ``sharded_softmax_cross_entropy`` with 2 processes, each holding half the table. Peak RSS
   (VmHWM, its mark reset once the table is made) minus RSS before the table is made: the table, its
   gradient and the call's working memory.

Appends one JSON line per measurement to benchmarks/results/distributed.jsonl and prints them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "distributed.jsonl"


def _machine() -> dict:
    cpu = ""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def _record(rec: dict) -> None:
    rec.update(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


# --------------------------------------------------------------------------- 1. data parallel


def _train(procs: int, threads: int, epochs: int, out: Path) -> dict:
    args = ["-m", "unirec", "train", "--data", "ml-100k", "--epochs", str(epochs), "--batch-size", "64",
            "--seed", "0", "--threads", str(threads), "--no-progress", "--out", str(out), "--results",
            str(out / "results.jsonl")]
    if procs == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] + args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"]
    ups = [h["users_per_s"] for h in hist if "users_per_s" in h]
    return {"procs": procs, "threads": threads, "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"],
            "users_per_s_mean": sum(ups) / max(len(ups), 1), "users_per_s_median": sorted(ups)[len(ups) // 2],
            "test_ndcg@10": m["test"]["ndcg@10"], "test_hr@10": m["test"]["hr@10"],
            "test_users": m["test"]["num_users"], "wall_s": wall,
            "command": " ".join(["torchrun --nproc_per_node=2" if procs > 1 else "python"] + args[:-4])}


def bench_train(epochs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        one = _train(1, 2, epochs, Path(tmp) / "one")
        two = _train(2, 1, epochs, Path(tmp) / "two")
    _record({"bench": "data_parallel_ml100k", "one_process_2_threads": one, "two_processes_1_thread": two,
             "users_per_s_ratio_2x1_over_1x2": two["users_per_s_mean"] / one["users_per_s_mean"],
             "ndcg@10_difference": two["test_ndcg@10"] - one["test_ndcg@10"]})


# --------------------------------------------------------------------------- 2. sharded loss memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _memory_worker(n_items: int, dim: int, rows: int) -> None:
    """Run under torchrun (or alone): prints this process's peak MB for the loss over its shard."""
    import torch

    from unirec import distributed, ops

    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=300)
    r, w = distributed.rank(), distributed.world_size()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=g).requires_grad_()
    targets = torch.randint(0, n_items, (rows,), generator=g)
    bounds = distributed.shard_bounds(n_items, w)
    base = _status_kb("VmRSS")
    # the table in chunks of 10^5 rows, each from its own seed, so the shards are the rows of one table
    chunk = 10 ** 5
    lo, hi = bounds[r], bounds[r + 1]
    items = torch.empty(hi - lo, dim)
    for c in range(lo // chunk, -(-hi // chunk)):
        assert lo % chunk == 0 and hi % chunk == 0, "shards aligned to the chunks"
        torch.randn(chunk, dim, generator=torch.Generator().manual_seed(1000 + c),
                    out=items[c * chunk - lo:(c + 1) * chunk - lo]).mul_(0.05)
    items.requires_grad_()
    # The peak mark restarts here: the table's making (chunks, temporaries) is not the loss's memory.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if w == 1:
        loss = ops.softmax_cross_entropy(hidden, items, targets)
    else:
        loss = distributed.sharded_softmax_cross_entropy(hidden, items, targets, offset=bounds[r], num_items=n_items)
    loss.backward()
    secs = time.perf_counter() - t0
    peak = (_status_kb("VmHWM") - base) / 1024
    print(json.dumps({"rank": r, "world": w, "peak_mb": round(peak, 1), "seconds": round(secs, 3),
                      "loss": float(loss)}), flush=True)
    distributed.shutdown()


def bench_memory(n_items: int = 10 ** 6, dim: int = 64, rows: int = 1024) -> None:
    res = {}
    for procs in (1, 2):
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else []) \
            + [str(Path(__file__).resolve()), "--memory-worker", str(n_items), str(dim), str(rows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=str(ROOT),
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        res[procs] = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    one = res[1][0]["peak_mb"]
    per = [x["peak_mb"] for x in sorted(res[2], key=lambda x: x["rank"])]
    _record({"bench": "sharded_loss_memory", "items": n_items, "dim": dim, "rows": rows,
             "unsharded_peak_mb": one, "sharded_2_ranks_peak_mb": per, "ratio_max_rank_over_unsharded": max(per) / one,
             "loss_unsharded": res[1][0]["loss"], "loss_sharded": res[2][0]["loss"],
             "command": "python benchmarks/bench_distributed.py --skip-train"})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _memory_worker(*(int(x) for x in sys.argv[2:5]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args()
    if not a.skip_memory:
        bench_memory()
    if not a.skip_train:
        bench_train(a.epochs)


if __name__ == "__main__":
    main()
