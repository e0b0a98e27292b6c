"""Mean and spread over seeds of RESULT lines (from scripts/run_experiment.py) grouped by config.

usage: python scripts/summarize_runs.py results.jsonl [PREFIX]   (lines "RESULT {json}"; other lines are
skipped; PREFIX keeps runs whose name starts with it, e.g. v2-)
"""
import json
import statistics as st
import sys
from collections import defaultdict

groups = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("RESULT"):
        continue
    r = json.loads(line.split("RESULT", 1)[-1])
    if len(sys.argv) > 2 and not r["out"].startswith(sys.argv[2]):
        continue
    key = r["preset"] + ("" if not r["over"] else " " + " ".join(f"{k}={v}" for k, v in sorted(r["over"].items())))
    groups[key].append(r)
cols = ["val_ndcg10", "ndcg10", "hr10", "ndcg10_unmasked", "rmse", "auc", "gauc", "best_epoch", "secs"]
print("| config | seeds | " + " | ".join(cols) + " |")
print("|---|---|" + "---|" * len(cols))
for key, rs in groups.items():
    cells = []
    for c in cols:
        vals = [r[c] for r in rs if r.get(c) is not None]
        if not vals:
            cells.append("-")
        elif c in ("best_epoch", "secs"):
            cells.append(f"{st.mean(vals):.0f}")
        else:
            sd = st.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{st.mean(vals):.4f} ± {sd:.4f}")
    print(f"| {key} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
