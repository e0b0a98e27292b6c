"""The runs behind the transfer tables (docs/model-results.md, "Pretraining and fine-tuning across data sets").

usage: python scripts/transfer_runs.py OUT [--slots 2] [--seeds2 0,1,2] [--dry-run]

Runs every job below, --slots at a time, each on one thread, the first ready one first; a job whose
run folder already holds test metrics is skipped, so the script resumes where it stopped. Setting 1
(OUT/runs1): pretrain on MovieLens-1M, fine-tune on shares of MovieLens-100K's users. Setting 2
(OUT/runs2): pretrain on the genre domain A of MovieLens-1M, fine-tune on domain B. Every method has the
same tuning budget: two candidates run at 10% with seed 0, and the one with the better validation
NDCG@10 runs the other seeds and shares. Then: python scripts/transfer_table.py OUT/runs1 (and runs2).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--slots", type=int, default=2)
p.add_argument("--seeds2", default="0,1,2", help="seeds of setting 2 (the slow one)")
p.add_argument("--dry-run", action="store_true")
args = p.parse_args()
OUT = Path(args.out).resolve()
(OUT / "logs").mkdir(parents=True, exist_ok=True)

EACH = ["--threads", "1", "--no-progress"]
SCHED1 = "--batch-size 64 --epochs 200 --patience 10 --warmup-steps 10 --time-budget 900".split()
SCHED2 = ("--data ml-1m --domain B --batch-size 64 --epochs 200 --patience 4 --eval-every 2 --warmup-steps 10 "
          "--time-budget 900").split()
TEXT = ["--text", "--set", "item_id_dropout=0.5"]
SCRATCH = {"s1": [], "s2": "--dim 64 --blocks 2 --max-len 200".split()}  # the ML-100K preset / the base's shape
LR = {"full": {"c1": "1e-3", "c2": "2e-3"}, "lora": {"c1": "2e-3", "c2": "5e-3"}}
CANDIDATES = {"scratch": SCRATCH, **LR}
SHARES = ("0.1", "0.25", "0.5", "1.0")
SEEDS = (0, 1, 2)
BASE1, BASE2 = OUT / "base-ml1m", OUT / "base-ml1m-A"
SETTINGS = {"runs1": (BASE1, ["--data", "ml-100k", *SCHED1]), "runs2": (BASE2, SCHED2)}
NOT_YET = (None, [], None)  # a job whose candidate is not chosen yet


def done(run: Path) -> bool:
    m = run / "metrics.json"
    return m.exists() and (run / "ranks.npz").exists() and "test" in json.loads(m.read_text())


def valid(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["valid"]["ndcg@10"]


def chosen(method: str):
    """Setting 1's candidate of ``method`` with the best seed-0 validation NDCG@10 at 10%, once all have run."""
    runs = {c: OUT / "runs1" / f"{method}-{c}-0.1-s0" for c in CANDIDATES[method]}
    if not all(done(r) for r in runs.values()):
        return None
    return max(runs, key=lambda c: valid(runs[c]))


def job(setting, method, cand, share, seed):
    """(run folder, runs it needs, command). method "loraadapter" is `--method lora+adapter` with LoRA's lr;
    frozen and adapter have one candidate, lr 2e-3."""
    if cand is None:
        return NOT_YET
    base, sched = SETTINGS[setting]
    run = OUT / setting / f"{method}-{cand}-{share}-s{seed}"
    common = [*sched, "--user-share", share, "--seed", str(seed), "--arm", f"{method}-{cand}-{share}"]
    if method == "scratch":
        return run, [], ["unirec", "train", *TEXT, *SCRATCH[cand], *common]
    lr = LR.get("lora" if method == "loraadapter" else method, {}).get(cand, "2e-3")
    m = "lora+adapter" if method == "loraadapter" else method
    return run, [base], ["unirec", "finetune", str(base), "--method", m, "--lr", lr, *common]


def jobs():
    """(run folder, runs it needs, command) in priority order; NOT_YET where the command is not known yet."""
    yield BASE1, [], ["unirec", "train", "--data", "ml-1m", *TEXT, "--time-budget", "1500"]
    yield BASE2, [], ["unirec", "train", "--data", "ml-1m", "--domain", "A", *TEXT, "--time-budget", "1200"]
    for method, cands in CANDIDATES.items():
        for c in cands:
            yield job("runs1", method, c, "0.1", 0)
    setting2 = (("scratch", "s2"), ("full", "c1"), ("lora", "c1"))  # one candidate each
    for m, c in setting2:
        yield job("runs2", m, c, "0.1", 0)
    pick = {m: chosen(m) for m in CANDIDATES}
    for share in SHARES:
        for seed in SEEDS:
            for m in CANDIDATES:
                yield job("runs1", m, pick[m], share, seed)
        if share == "0.1":
            yield job("runs1", "frozen", "c1", "0.1", 0)
            yield job("runs1", "adapter", "c1", "0.1", 0)
        if share in ("0.1", "1.0"):
            yield job("runs1", "loraadapter", pick["lora"], share, 0)
        if share == "0.25":
            for m, c in setting2:
                yield job("runs2", m, c, "0.25", 0)
    for seed in [int(s) for s in args.seeds2.split(",") if s and s != "0"]:
        for share in ("0.1", "0.25"):
            for m, c in setting2:
                yield job("runs2", m, c, share, seed)


def log(msg):
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(OUT / "progress.log", "a") as f:
        f.write(line + "\n")


if args.dry_run:
    for run, needs, cmd in jobs():
        print(run, "needs", [str(n) for n in needs], " ".join(cmd or ["(after the candidates)"]))
    sys.exit()

running, failed = {}, set()  # run folder -> Popen; folders left as they are
while True:
    for run, proc in list(running.items()):
        if proc.poll() is not None:
            log(f"end {run.parent.name}/{run.name} rc={proc.returncode}"
                + (f" valid {valid(run):.4f}" if done(run) else ""))
            del running[run]
    pending = [(run, needs, cmd) for run, needs, cmd in jobs() if run is None or not done(run)]
    if not pending and not running:
        break
    for run, needs, cmd in pending:
        if len(running) >= args.slots:
            break
        if run is None or run in running or run in failed or cmd is None or not all(done(n) for n in needs):
            continue
        if run.exists():
            log(f"{run.parent.name}/{run.name} has a run folder but no test metrics (a failed run?); not rerun")
            failed.add(run)
            continue
        log(f"start {run.parent.name}/{run.name}")
        logf = open(OUT / "logs" / f"{run.parent.name}-{run.name}.log", "w")
        running[run] = subprocess.Popen([*cmd, *EACH, "--out", str(run)], stdout=logf, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not running:
        log("nothing can start: see the logs of the runs that failed")
        break
    time.sleep(10)
