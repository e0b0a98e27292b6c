"""Benchmark tables, from a pytest-benchmark JSON file or from the benchmark records.

    python benchmarks/report.py bench.json [--markdown]   # one --benchmark-json file as one table
    python benchmarks/report.py measure [--all] [--write]  # run the README-table benchmarks, then `tables`
    python benchmarks/report.py tables [--run ID] [--write] [--records FILE]

``measure`` runs the benchmarks behind the README table (``--all``: every
benchmark file but serving's, whole, for RESULTS.md) in one run; each timed provider
appends a record to benchmarks/results/<machine>.jsonl (benchmarks/conftest.py).
``tables`` prints, from those records, the README table and RESULTS.md's
per-group tables, each with the command that produced it; ``--write`` also
puts them between the ``<!-- report:NAME -->`` ... ``<!-- /report:NAME -->``
markers of README.md and benchmarks/RESULTS.md (where the markers exist).
Each group's rows come from the latest run that measured that group, so the
providers of a table were timed back to back. A figure is "median (min-max)"
over the record's timed rounds (at least 5).
"""
import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- a pytest-benchmark JSON file as one table ---------------------------------------------------

def rows(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    for group, items in groups.items():
        items.sort(key=lambda b: b["stats"]["median"])
        slowest = max(b["stats"]["median"] for b in items)
        for b in items:
            x = b["extra_info"]
            rate = ""
            if "gb_per_s" in x:
                rate = f"{x['gb_per_s']} GB/s ({100 * x['roofline_fraction']:.0f}% of copy)"
            elif "gflop_per_s" in x:
                rate = f"{x['gflop_per_s']} GFLOP/s ({100 * x['roofline_fraction_flops']:.0f}% of matmul)"
            mem = x.get("peak_mem_mb", x.get("peak_rss_mb", ""))
            st = b["stats"]
            yield (group, b["name"], f"{st['median'] * 1e3:.3f}", f"{st['min'] * 1e3:.3f}-{st['max'] * 1e3:.3f}",
                   f"{slowest / st['median']:.2f}x", rate, f"{mem}" if mem != "" else "")
    info = data.get("machine_info", {})
    yield ("machine", info.get("cpu", {}).get("brand_raw", info.get("processor", "")), "", "", "", "", "")


def print_table(head, body, markdown):
    if markdown:
        print(markdown_table(head, body))
        return
    table = [head] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def markdown_table(head, body):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


# --- records -------------------------------------------------------------------------------------

def default_records():
    """The most recently written record file under benchmarks/results/."""
    folder = os.path.join(HERE, "results")
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jsonl")] \
        if os.path.isdir(folder) else []
    if not files:
        sys.exit("no records: run `python benchmarks/report.py measure` (or pytest benchmarks/ --benchmark-only)")
    return max(files, key=os.path.getmtime)


def load_records(path, run=None):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if run is None or r["run_id"] == run]


def latest_by_group(recs):
    """group -> {provider: record}, each group from the latest run that measured it."""
    runs = defaultdict(lambda: defaultdict(dict))  # group -> run -> provider -> record
    for r in recs:
        runs[r["group"]][r["run_id"]][r["provider"]] = r  # a provider timed twice in a run: the last
    out = {}
    for group, by_run in runs.items():
        out[group] = by_run[max(by_run, key=lambda run: max(r["time"] for r in by_run[run].values()))]
    return out


def ms(x):
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def figure(r):
    """'median ms (min-max)' of a record, or why there is none."""
    if r["status"] != "ok":
        return "unsupported"
    if r["median_ms"] >= 10_000:
        return f"{r['median_ms'] / 1e3:.3g} s ({r['min_ms'] / 1e3:.3g}-{r['max_ms'] / 1e3:.3g})"
    return f"{ms(r['median_ms'])} ms ({ms(r['min_ms'])}-{ms(r['max_ms'])})"


def rate_text(r):
    rate, frac = r.get("rate") or {}, r.get("roofline_fraction")
    if "gb_per_s" in rate:
        return f"{rate['gb_per_s']} GB/s ({100 * frac:.0f}% of copy)"
    if "gflop_per_s" in rate:
        return f"{rate['gflop_per_s']} GFLOP/s ({100 * frac:.0f}% of matmul)"
    return ""


def memory_mb(r):
    x = r.get("extra") or {}
    return x.get("peak_extra_mb", x.get("peak_rss_mb", x.get("peak_mem_mb")))


KIND_ORDER = {"unirec": 0, "peer": 1, "stock": 2, "reference": 3}


def group_table(recs):
    """The rows of one group: providers by kind then speed, each against unirec's median."""
    ok = [r for r in recs.values() if r["status"] == "ok"]
    ours = min((r["median_ms"] for r in ok if r["kind"] == "unirec"), default=None)
    body = []
    for r in sorted(recs.values(), key=lambda r: (KIND_ORDER.get(r["kind"], 9), r.get("median_ms") or 1e18)):
        if r["status"] != "ok":
            body.append((r["provider"], r["kind"], "unsupported", "", "", "", r.get("reason", "")))
            continue
        vs = f"{r['median_ms'] / ours:.2f}x" if ours else ""
        mem = memory_mb(r)
        body.append((r["provider"], r["kind"], figure(r), str(r["rounds"]), vs, rate_text(r),
                     "" if mem is None else f"{mem} MB"))
    return body


def run_summary(recs):
    """One line on where and when a set of records was measured, and the commands."""
    rs = list(recs)
    loads = [r["load_avg"][0] for r in rs]
    first = rs[0]
    where = (f"{first.get('cpu') or first.get('gpu')} ({first.get('cores')} cores, {first.get('cpu_flags')}"
             f"{', unirec ' + first['unirec_cpu_isa'] if first.get('unirec_cpu_isa') else ''}), "
             f"torch {first['torch']}"
             + "".join(f", {k} {v}" for k, v in sorted(first.get("versions", {}).items()) if k != "torch"))
    dates = sorted({r["time"][:10] for r in rs})
    commits = sorted({r["commit"][:12] + ("-dirty" if r["commit"].endswith("-dirty") else "") for r in rs})
    return (f"{where}; run {', '.join(sorted({r['run_id'] for r in rs}))} ({', '.join(dates)}), "
            f"commit {', '.join(commits)}, load average {min(loads):.2f}-{max(loads):.2f}")


def commands(recs):
    return sorted({r["command"] for r in recs})


def results_sections(groups):
    """RESULTS.md: one table per group, grouped by op, each with its run line and command."""
    by_op = defaultdict(list)
    for group, recs in groups.items():
        by_op[next(iter(recs.values()))["op"]].append(group)
    head = ("provider", "kind", "median (min-max)", "rounds", "time vs unirec", "rate", "memory")
    out = []
    first_time = {g: min(r["time"] for r in recs.values()) for g, recs in groups.items()}
    for op in sorted(by_op):
        out.append(f"### {op}\n")
        for group in sorted(by_op[op], key=lambda g: (first_time[g], g)):  # in the order measured
            recs = groups[group]
            out.append(f"**{group}**\n")
            out.append(markdown_table(head, group_table(recs)) + "\n")
            out.append(f"{run_summary(recs.values())}.\n")
            out.append("\n".join(f"    {c}" for c in commands(recs.values())) + "\n")
    return "\n".join(out)


# README: each row one group; the columns pick providers by kind. "Best stock" is the fastest stock
# provider measured in that group (named in the cell), never a chosen one; the last column is the
# fastest peer or stock provider's median over unirec's (the reference's where there is neither).
README_ROWS = [
    ("table_batched_embedding fwd, B=512 T=32 D=64, Zipf ids", "tbe forward B512 T32 D64"),
    ("table_batched_embedding fwd, B=512 T=8 D=128", "tbe forward B512 T8 D128"),
    ("table_batched_embedding fwd, B=512 T=1 D=64", "tbe forward B512 T1 D64"),
    ("table_batched_embedding fwd+bwd (dense gradient), T=32 D=64", "tbe forward+backward B512 T32 D64"),
    ("train step, T=32 tables of 10^5 rows, D=64 (fused row-wise Adagrad)", "tbe train step B512 T32 D64 rows1e5"),
    ("train step, T=8 D=128", "tbe train step B512 T8 D128 rows1e5"),
    ("train step, T=1 D=64", "tbe train step B512 T1 D64 rows1e5"),
    ("train step, one table of 10^6 rows, D=64", "tbe train step B512 T1 D64 rows1e6"),
    ("jagged_attention softmax fwd+bwd, B=16 L<=1024 H=4 Dh=64", "attention-softmax-long_B16_N1024_H4_D64-fwd+bwd"),
    ("jagged_attention silu fwd+bwd, same", "attention-silu-long_B16_N1024_H4_D64-fwd+bwd"),
    ("topk_scores B=256 N=10^6 D=64 k=100, 50 seen ids excluded", "topk_scores B=256 N=1000000 D=64 k=100 float32"),
    ("softmax_cross_entropy fwd+bwd M=4096 N=10^5 D=64", "softmax_ce fwd+bwd M=4096 N=100000 D=64 float32"),
    ("softmax_cross_entropy fwd+bwd, one MovieLens step (M=2700 N=1682 D=96)",
     "softmax_ce fwd+bwd M=2700 N=1682 D=96 float32"),
    ("dropout fwd+bwd 2700 x 96, p = 0.15", "dropout fwd+bwd 2700x96"),
    ("one training epoch, MovieLens-100K, unified model (50-event windows)", "train epoch ml-100k unified max_len 50"),
    ("the same model over 200-event windows", "train epoch ml-100k unified max_len 200"),
]


def readme_cell(recs, kind, with_name):
    cands = [r for r in recs.values() if r["kind"] == kind]
    ok = [r for r in cands if r["status"] == "ok"]
    if not ok:
        return "unsupported" if cands else ""
    best = min(ok, key=lambda r: r["median_ms"])
    mem = memory_mb(best)
    text = figure(best) + (f", {mem:.0f} MB peak" if mem is not None and kind != "reference" else "")
    return text + (f" ({best['provider']})" if with_name else "")


def readme_table(groups):
    head = ("op, shape", "unirec", "FBGEMM", "best stock PyTorch", "reference", "best other / unirec")
    body, used = [], []
    for label, group in README_ROWS:
        recs = groups.get(group)
        if not recs:
            continue
        used.append(recs)
        ours = [r for r in recs.values() if r["kind"] == "unirec" and r["status"] == "ok"]
        others = [r for r in recs.values() if r["kind"] in ("peer", "stock") and r["status"] == "ok"]
        # Only where no peer or stock way exists (a training epoch) is the reference the other.
        others = others or [r for r in recs.values() if r["kind"] == "reference" and r["status"] == "ok"]
        ratio = ""
        if ours and others:
            ratio = f"{min(r['median_ms'] for r in others) / min(r['median_ms'] for r in ours):.2f}x"
        body.append((label, readme_cell(recs, "unirec", False), readme_cell(recs, "peer", False),
                     readme_cell(recs, "stock", True), readme_cell(recs, "reference", False), ratio))
    if not body:
        return "(no records of the README groups: run `python benchmarks/report.py measure`)"
    allrecs = [r for recs in used for r in recs.values()]
    return (markdown_table(head, body) + "\n\nEach figure: median (min-max) over the timed rounds. "
            + run_summary(allrecs) + ".\n\n" + "\n".join(f"    {c}" for c in commands(allrecs)))


# Pairs whose ratio the issues ask for: (what, group, numerator provider, denominator provider, target).
TARGETS = [
    (f"forward T={t} D={d}: FBGEMM / unirec", f"tbe forward B512 T{t} D{d}", "fbgemm", "unirec", 2.0)
    for t, d in ((32, 64), (8, 128), (1, 64))
] + [
    (f"train step T={t} D={d}: FBGEMM / unirec", f"tbe train step B512 T{t} D{d} rows1e5",
     "fbgemm_exact_rowwise_adagrad", "unirec_fused_rowwise_adagrad", 1.5)
    for t, d in ((32, 64), (8, 128), (1, 64))
]


def targets_table(groups):
    body = []
    for what, group, num, den, target in TARGETS:
        recs = groups.get(group, {})
        a, b = recs.get(num), recs.get(den)
        if not a or not b or a["status"] != "ok" or b["status"] != "ok":
            continue
        ratio = a["median_ms"] / b["median_ms"]
        # The range pairs each side's extremes: the worst and the best ratio any two rounds allow.
        body.append((what, f"{ms(a['median_ms'])} / {ms(b['median_ms'])} ms", f"**{ratio:.2f}x**",
                     f"{a['min_ms'] / b['max_ms']:.2f}x-{a['max_ms'] / b['min_ms']:.2f}x", f">= {target}x",
                     "met" if ratio >= target else "not met"))
    if not body:
        return "(no FBGEMM records: install fbgemm-gpu-cpu and run `python benchmarks/report.py measure`)"
    return markdown_table(("ratio", "medians", "ratio of medians", "round extremes", "target", ""), body)


def generated(groups):
    return {"readme": readme_table(groups), "targets": targets_table(groups), "results": results_sections(groups)}


def write_blocks(path, blocks):
    """Replace the text between <!-- report:NAME --> and <!-- /report:NAME --> for each block."""
    with open(path) as f:
        text = f.read()
    done = []
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- report:{name} -->\n).*?(\n<!-- /report:{name} -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m: m.group(1) + body + m.group(2), text)
            done.append(name)
    with open(path, "w") as f:
        f.write(text)
    return done


def cmd_tables(args):
    path = args.records or default_records()
    groups = latest_by_group(load_records(path, args.run))
    blocks = generated(groups)
    print(f"records: {os.path.relpath(path, ROOT)}\n")
    print("## README table\n")
    print(blocks["readme"])
    print("\n## FBGEMM ratios\n")
    print(blocks["targets"])
    print("\n## RESULTS.md tables\n")
    print(blocks["results"])
    if args.write:
        for target in (os.path.join(ROOT, "README.md"), os.path.join(HERE, "RESULTS.md")):
            done = write_blocks(target, blocks)
            print(f"wrote {', '.join(done) or 'nothing (no markers)'} into {os.path.relpath(target, ROOT)}",
                  file=sys.stderr)


# What `measure` runs: (file, -k expression or None for the whole file). The README selection
# should take 5-6 minutes on 2 quiet cores (an estimate from earlier quiet medians); --all runs
# every file whole.
README_SELECTION = [
    ("bench_embedding.py", "T32-D64 or T8-D128 or T1-D64"),
    ("bench_attention.py", "long"),
    ("bench_retrieval.py", "N1000000"),
    ("bench_loss.py", None),
    ("bench_dropout.py", "fwd_bwd and 2700x96"),
    ("bench_train.py", None),
]
ALL_FILES = ["bench_embedding.py", "bench_attention.py", "bench_retrieval.py", "bench_loss.py",
             "bench_dropout.py", "bench_train.py"]


def cmd_measure(args):
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    command = shlex.join(["python", "benchmarks/report.py", *sys.argv[1:]])
    env = dict(os.environ, UNIREC_BENCH_RUN_ID=run_id, UNIREC_BENCH_COMMAND=command,
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if args.records:
        env["UNIREC_BENCH_RECORDS"] = os.path.abspath(args.records)
    selection = [(f, None) for f in ALL_FILES] if args.all else README_SELECTION
    if args.k:
        selection = [(f, args.k) for f, _ in selection]
    failed = []
    for name, expr in selection:
        cmd = [sys.executable, "-m", "pytest", os.path.join("benchmarks", name), "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "--benchmark-columns=median,min,max,rounds"]
        if expr:
            cmd += ["-k", expr]
        print("+ " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc not in (0, 5):  # 5: nothing selected (e.g. a -k that matches no test of this file)
            failed.append(name)
    # The tables take each group from its latest run: this one for every group it measured.
    print(f"run {run_id} done", flush=True)
    args.run = None
    if args.records is None:
        sys.path.insert(0, HERE)
        import torch
        from conftest import records_path  # the file the benchmarks wrote to
        device = os.environ.get("UNIREC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
        args.records = records_path(device)
    cmd_tables(args)
    if failed:
        sys.exit(f"benchmark failures in: {', '.join(failed)}")


def main():
    argv = sys.argv[1:]
    if argv and argv[0] in ("measure", "tables"):
        ap = argparse.ArgumentParser(prog=f"report.py {argv[0]}")
        ap.add_argument("--records", help="record file (default: the newest file under benchmarks/results/)")
        ap.add_argument("--write", action="store_true", help="fill the report markers of README.md and RESULTS.md")
        if argv[0] == "tables":
            ap.add_argument("--run", help="only this run id (default: per group, its latest run)")
            cmd_tables(ap.parse_args(argv[1:]))
        else:
            ap.add_argument("--all", action="store_true", help="every benchmark file, whole")
            ap.add_argument("-k", help="replace each file's selection by this pytest -k expression")
            cmd_measure(ap.parse_args(argv[1:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    head = ("group", "provider", "median ms", "min-max ms", "vs slowest", "rate", "peak MB")
    print_table(head, list(rows(args.json)), args.markdown)


if __name__ == "__main__":
    main()
