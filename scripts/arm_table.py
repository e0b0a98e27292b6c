"""A markdown table of arms against a baseline from the records `unirec train --results FILE` writes.

    python scripts/arm_table.py FILE --baseline unified-all [--arms a-all,b-all,...] [--metric ndcg@10]

Each record line names its arm, seed and run folder. Per arm: the seeds, validation and test
NDCG@10 and HR@10 (mean and standard deviation over seeds), training seconds to the chosen
epoch, and the paired difference to the baseline on the test metric (`unirec compare`'s
bootstrap over users and seeds, :func:`unirec.evaluation.compare.compare_runs`), with the seeds
the two arms share. The last record of an (arm, seed) counts, so a rerun replaces an earlier one.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from unirec.evaluation.compare import compare_runs


def mean_sd(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", help="results file (JSON lines of `unirec train --results`)")
    p.add_argument("--baseline", required=True, help="the baseline arm's name")
    p.add_argument("--arms", default=None, help="arms to list, comma-separated, in this order (default: all)")
    p.add_argument("--metric", default="ndcg@10", help="metric of the paired difference (default: %(default)s)")
    p.add_argument("--samples", type=int, default=10000, help="bootstrap samples (default: %(default)s)")
    args = p.parse_args(argv)

    runs = {}
    for line in Path(args.records).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs.setdefault(r["arm"], {})[r["seed"]] = r
    if args.baseline not in runs:
        sys.exit(f"no records of the baseline arm {args.baseline!r}; arms: {', '.join(sorted(runs))}")
    arms = args.arms.split(",") if args.arms else list(runs)
    missing = [a for a in arms if a not in runs]
    if missing:
        sys.exit(f"no records of arm(s) {', '.join(missing)}; arms: {', '.join(sorted(runs))}")
    base = runs[args.baseline]
    m = args.metric
    print(f"| arm | seeds | valid {m} | test {m} | test hr@10 | s to the chosen epoch | vs {args.baseline}: "
          f"{m} difference [95% interval] |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        rs = runs[arm]
        seeds = sorted(rs)
        cells = [arm, ",".join(map(str, seeds)),
                 mean_sd([rs[s]["metrics"]["valid"][m] for s in seeds]),
                 mean_sd([rs[s]["metrics"]["test"][m] for s in seeds]),
                 mean_sd([rs[s]["metrics"]["test"]["hr@10"] for s in seeds]),
                 f"{statistics.mean(rs[s]['seconds_to_best'] for s in seeds):.0f}"]
        shared = [s for s in seeds if s in base]
        if arm == args.baseline or not shared:
            cells.append("")
        else:
            res = compare_runs([rs[s]["run"] for s in shared], [base[s]["run"] for s in shared], [m],
                               num_samples=args.samples)["metrics"][m]
            rel = float("nan") if res["relative"] is None else res["relative"]
            cells.append(f"{res['diff']:+.4f} ({rel:+.1%}) [{res['low']:+.4f}, {res['high']:+.4f}]"
                         + ("" if len(shared) == len(seeds) else f" (seeds {','.join(map(str, shared))})"))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
