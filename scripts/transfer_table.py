"""The transfer table: method x data share, from run folders whose arm is "<method>-<candidate>-<share>".

usage: python scripts/transfer_table.py ROOT [--records FILE] [--setting NAME]

Every run folder under ROOT (written by `unirec train` / `unirec finetune` with --arm as above) is
grouped by (method, share, candidate). Each method's candidate at each share is the one with the best
seed-0 validation NDCG@10 (the same rule and the same number of candidates for every method,
"scratch" included); its runs of every seed are reported. Prints a markdown table (test NDCG@10 mean and
standard deviation over seeds, trainable and total parameters, training seconds to the best epoch and,
for a transfer method, to the first epoch whose validation NDCG@10 reaches the from-scratch run's best
(same share and seed; "-" when some seed never does), weights file size) and, for each share, the
paired interval (users x seeds, `unirec compare`) of each method against "scratch"; --records appends
one JSON line per (method, share) to FILE.
"""
import argparse
import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

from unirec.evaluation import compare_runs

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--records", default=None)
p.add_argument("--setting", default="")
args = p.parse_args()

groups = defaultdict(list)
for cfg in sorted(Path(args.root).glob("*/config.json")):
    run = cfg.parent
    if not (run / "metrics.json").exists() or not (run / "ranks.npz").exists():
        continue
    c, m = json.loads(cfg.read_text()), json.loads((run / "metrics.json").read_text())
    if "test" not in m:
        continue
    try:
        method, cand, share = c["arm"].rsplit("-", 2)
        share = float(share)
    except ValueError:
        print(f"skipped {run}: arm {c['arm']!r} is not <method>-<candidate>-<share>", file=sys.stderr)
        continue
    groups[(method, share, cand)].append(dict(run=str(run), seed=c["train"]["seed"], valid=m["valid"]["ndcg@10"],
                                              test=m["test"]["ndcg@10"], hr=m["test"]["hr@10"],
                                              params=m.get("parameters") or {}, to_best=m.get("seconds_to_best"),
                                              bytes=m.get("checkpoint_bytes"), epoch=m.get("best_epoch"),
                                              history=m.get("history") or []))


def seconds_to_reach(run, target):
    """Training seconds until the first epoch whose validation NDCG@10 is at least ``target`` (None: never)."""
    t = 0.0
    for h in run["history"]:
        t += h["seconds"]
        if h.get("val_ndcg@10") is not None and h["val_ndcg@10"] >= target:
            return t
    return None

best = {}
for (method, share, cand), runs in groups.items():
    seed0 = [r["valid"] for r in runs if r["seed"] == 0]
    if not seed0:
        continue
    score = seed0[0]
    if (method, share) not in best or score > best[(method, share)][0]:
        best[(method, share)] = (score, cand, sorted(runs, key=lambda r: r["seed"]))

order = ["scratch", "full", "frozen", "adapter", "lora", "loraadapter"]
shares = sorted({s for _, s in best})
print(f"| method | share | candidate | seeds | test NDCG@10 | vs scratch (paired 95% interval) | trained / total "
      f"parameters | s to best epoch | s to scratch's best | weights MB |")
print("|---|---|---|---|---|---|---|---|---|---|")
out = []
for method in sorted({m for m, _ in best}, key=lambda m: order.index(m) if m in order else 99):
    for share in shares:
        if (method, share) not in best:
            continue
        _, cand, runs = best[(method, share)]
        tests = [r["test"] for r in runs]
        sd = st.stdev(tests) if len(tests) > 1 else 0.0
        vs, reach = "", ""
        rec = dict(setting=args.setting, method=method, share=share, candidate=cand, seeds=[r["seed"] for r in runs],
                   runs=[r["run"] for r in runs], test_ndcg10=st.mean(tests), test_ndcg10_sd=sd,
                   test_hr10=st.mean(r["hr"] for r in runs), valid_ndcg10=st.mean(r["valid"] for r in runs),
                   params=runs[0]["params"], seconds_to_best=st.mean(r["to_best"] or 0 for r in runs),
                   weights_bytes=runs[0]["bytes"])
        if method != "scratch" and ("scratch", share) in best:
            seeds = {r["seed"] for r in runs}
            base = [r for r in best[("scratch", share)][2] if r["seed"] in seeds]
            runs_paired = [r for r in runs if r["seed"] in {b["seed"] for b in base}]
            cmp = compare_runs([r["run"] for r in runs_paired], [r["run"] for r in base], metrics=("ndcg@10",))
            d = cmp["metrics"]["ndcg@10"]
            rel = d["relative"] if d["relative"] is not None else float("nan")
            vs = f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({rel:+.1%})"
            rec["vs_scratch"] = {k: d[k] for k in ("diff", "low", "high", "relative", "num_users", "num_seeds")}
            times = [seconds_to_reach(r, b["valid"]) for r, b in zip(runs_paired, base)]
            rec["seconds_to_scratch_best"] = None if None in times else st.mean(times)
            reach = "-" if None in times else f"{st.mean(times):.0f}"
        pr = runs[0]["params"]
        ptxt = f"{pr.get('trainable', 0):,} / {pr.get('total', 0):,}" if pr else "-"
        print(f"| {method} | {share:g} | {cand} | {len(runs)} | {st.mean(tests):.4f} ± {sd:.4f} | {vs} | {ptxt} | "
              f"{rec['seconds_to_best']:.0f} | {reach} | {(runs[0]['bytes'] or 0) / 1e6:.2f} |")
        out.append(rec)
if args.records:
    with open(args.records, "a") as f:
        for rec in out:
            f.write(json.dumps(rec) + "\n")
print(f"\n{len(out)} rows from {sum(len(v) for v in groups.values())} runs", file=sys.stderr)
