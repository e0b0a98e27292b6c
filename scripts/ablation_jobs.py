"""Job lines for the quality tables: each config x seeds 0, 1, 2, at the tuned hyper-parameters.

usage: python scripts/ablation_jobs.py TUNE_UNIFIED TUNE_SASREC [EPOCHS] > jobs.txt
       xargs -P 2 -L 1 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/run_experiment.py < jobs.txt >> results.jsonl

TUNE_*: output folders of `unirec tune --config unified|sasrec` (their best.json). The unified search's
hyper-parameters hold for every ablation row; the SASRec-equivalent baseline uses its own search's.
"""
import json
import sys
from pathlib import Path

TUNED = ("lr", "weight_decay", "dropout", "dim", "num_blocks", "max_len")
ROWS = [  # name, preset, config overrides
    ("ids", "sasrec", {}),
    ("attrs", "sasrec", {"use_item_features": True}),
    ("attrs-profile", "sasrec", {"use_item_features": True, "use_profile": True}),
    ("tokens", "unified", {"objectives": {"retrieval": 1.0}, "repeat_bias": False}),
    ("rank-head", "unified", {"repeat_bias": False}),
    ("unified", "unified", {}),
    ("hstu", "hstu", {}),
]


def overrides(best: dict, extra: dict) -> list:
    out = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in extra.items()]  # one word per value
    for k in TUNED:
        if k in best["params"]:
            out.append(f"{'train.' if k in best['train'] and k not in best['model'] else ''}{k}={best['params'][k]}")
    return out


uni = json.loads((Path(sys.argv[1]) / "best.json").read_text())
sas = json.loads((Path(sys.argv[2]) / "best.json").read_text())
epochs = sys.argv[3] if len(sys.argv) > 3 else "20"
for seed in (0, 1, 2):
    print(f"tuned-sasrec-s{seed} sasrec {seed} {epochs} train.patience=5 " + " ".join(overrides(sas, {})))
    for name, pre, extra in ROWS:
        print(f"tuned-{name}-s{seed} {pre} {seed} {epochs} train.patience=5 " + " ".join(overrides(uni, extra)))
