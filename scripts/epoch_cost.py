"""Seconds per training epoch of one model config with each self-supervised objective or augmentation
switched on, the same data, initial weights and batches, one after the other in one process.

    PYTHONPATH=$PWD python scripts/epoch_cost.py [--data ml-100k] [--threads 1] [--repeats 2] \
        [--user-share 0.25] [--arms "windows all;augment-data insert"] > cost.jsonl

Prints one JSON line per arm when all have run: the median epoch over --repeats (after one warm-up
epoch of the baseline), the ratio to the baseline (timed first and last, the ratio against their
mean), the CPU model, ISA and load average.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from unirec.data import TokenBuilder, TrainBatches, leave_one_out, load_dataset, training_users
from unirec.models import UniRec, preset, preset_training
from unirec.training import TrainConfig, Trainer

# arm -> (objectives added to the preset's, data augmentation rates, TrainConfig overrides)
ARMS = {
    "baseline": ({}, None, {}),
    "contrastive=0.1": ({"contrastive": 0.1}, None, {}),
    "duorec=0.1": ({"duorec": 0.1}, None, {}),
    "cloze=0.3": ({"cloze": 0.3}, None, {}),
    "attributes=0.1": ({"attributes": 0.1}, None, {}),
    "augment-data crop": ({}, {"crop": 0.6}, {}),
    "augment-data mask": ({}, {"mask": 0.3}, {}),
    "augment-data reorder": ({}, {"reorder": 0.6}, {}),
    "augment-data substitute": ({}, {"substitute": 0.3}, {}),
    "augment-data insert": ({}, {"insert": 0.3}, {}),
    "augment-data substitute,insert": ({}, {"substitute": 0.3, "insert": 0.3}, {}),
    "augment-data insert, share 0.5": ({}, {"insert": 0.3}, {"augment_share": 0.5}),
    "windows all": ({}, None, {"windows": "all"}),
    "windows all + augment-data insert": ({}, {"insert": 0.3}, {"windows": "all"}),
    "windows all + augment-data insert, share 0.5": ({}, {"insert": 0.3}, {"windows": "all", "augment_share": 0.5}),
}


def cpu_facts():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    return {"cpu": model, "isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline",
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="ml-100k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--user-share", type=float, default=1.0, help="train on this share of the users (the sparse regime)")
    ap.add_argument("--arms", default=None, help="arm names separated by ; (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    split = leave_one_out(ds)
    base_cfg = preset("unified", args.data)
    base_train = {k: v for k, v in preset_training("unified", args.data).items() if k in ("batch_size", "windows")}
    users = None if args.user_share >= 1 else training_users(split.train_len, args.user_share, 0)
    times = {}
    arms = ["baseline"] + [a for a in (args.arms.split(";") if args.arms else ARMS) if a != "baseline"]
    # the baseline is timed first and again last: a machine whose speed drifts shows in the two figures
    for warm, arm in [(True, "baseline")] + [(False, a) for a in arms] + [(False, "baseline")]:
        extra, augment, train = ARMS[arm]
        torch.manual_seed(0)
        cfg = preset("unified", args.data, objectives={**base_cfg.objectives, **extra})
        model = UniRec.from_dataset(ds, cfg)
        tc = TrainConfig(epochs=1, **{"batch_size": 64, **base_train, **train})
        batches = TrainBatches(TokenBuilder.for_config(split, cfg), tc.batch_size, model.needs_candidates, 0,
                               tc.windows, augment, users, tc.augment_share)
        trainer = Trainer(model, batches, tc, progress=False, log=lambda s: None)
        secs = []
        for _ in range(1 if warm else args.repeats):
            t0 = time.perf_counter()
            trainer.train_epoch(0)
            secs.append(time.perf_counter() - t0)
        if not warm:
            times.setdefault(arm, []).append((statistics.median(secs), os.getloadavg()))
    base = statistics.mean(t for t, _ in times["baseline"])  # the ratios use the mean of the two baselines
    for arm, runs in times.items():
        for t, load in runs:
            print(json.dumps({"bench": "epoch_cost", "data": args.data, "user_share": args.user_share, "arm": arm,
                              "epoch_s": round(t, 3), "vs_baseline": round(t / base, 3), "repeats": args.repeats,
                              "threads": args.threads, "load": load, **cpu_facts()}), flush=True)


if __name__ == "__main__":
    main()
