"""Print a pytest-benchmark JSON file as one table: per group, each provider's
median, its speed-up over the slowest provider and over named baselines, and
its rates.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [--markdown]
"""
import argparse
import json
from collections import defaultdict


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
            yield (group, b["name"], f"{b['stats']['median'] * 1e3:.3f}", f"{slowest / b['stats']['median']:.2f}x",
                   rate, f"{mem}" if mem != "" else "")
    info = data.get("machine_info", {})
    yield ("machine", info.get("cpu", {}).get("brand_raw", info.get("processor", "")), "", "", "", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    head = ("group", "provider", "median ms", "vs slowest", "rate", "peak MB")
    table = [head] + list(rows(args.json))
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in table[1:]:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
