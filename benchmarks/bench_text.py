"""Time of the item text vectors (unirec.data.text): every item of a data set embedded into a fresh,
empty cache folder, then the same call again from the cache.

    python benchmarks/bench_text.py --data ml-100k ml-1m --out text.jsonl
    python benchmarks/bench_text.py --data ml-1m --batch-size 64 --threads 2

Per data set, two fresh subprocesses share one empty cache folder (a temporary one, removed after):

- cold: ``load_text_encoder`` (importing sentence-transformers and reading the weights) then
  ``text_vectors`` of every item's text; the figure is the two together, texts/s is of the embedding;
- cached: ``item_texts`` + ``text_vectors`` of the same texts, which must find them all in the cache and
  so never load the encoder (the child says whether sentence_transformers got imported).

Targets on the 2-core CPU: ML-100K cold <= 30 s, ML-1M cold <= 60 s, cached <= 1 s. Prints a table and
appends one JSON line per data set to --out: the machine (CPU model, its widest ISA, load average,
torch threads), the seconds (wall and CPU), the items and the texts/s (per wall and per CPU second: on a
shared machine the second is the steadier figure). Not a pytest benchmark (no test functions).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import machine_info  # noqa: E402  (the benchmarks' one record of the machine)

TARGETS = {"ml-100k": 30.0, "ml-1m": 60.0}
CACHED_TARGET = 1.0


def child(args) -> dict:
    """One timed phase in this (fresh) process; returns its figures."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from unirec.data import load_dataset
    from unirec.data import text
    ds = load_dataset(args.data[0])
    t1 = time.perf_counter()
    texts = text.item_texts(ds)
    t2 = time.perf_counter()
    rec = {"threads": torch.get_num_threads(), "torch": torch.__version__, "items": ds.num_items,
           "distinct_texts": len({t for t in texts if t}), "dataset_s": t1 - t0, "item_texts_s": t2 - t1}
    if args.child == "cold":
        c2 = time.process_time()
        text.load_text_encoder(device="cpu")
        t3, c3 = time.perf_counter(), time.process_time()
        v = text.text_vectors(texts, home=args.home, device="cpu", batch_size=args.batch_size)
        t4, c4 = time.perf_counter(), time.process_time()
        # CPU seconds (all threads) tell a shared machine's figure apart from a quiet one's.
        rec.update(load_s=t3 - t2, embed_s=t4 - t3, cold_s=t4 - t2, load_cpu_s=c3 - c2, embed_cpu_s=c4 - c3)
    else:
        v = text.text_vectors(texts, home=args.home, device="cpu", batch_size=args.batch_size)
        rec.update(vectors_s=time.perf_counter() - t2, cached_s=time.perf_counter() - t1)
    rec.update(shape=list(v.shape), encoder_loaded=bool(text._ENCODERS),
               sentence_transformers_imported="sentence_transformers" in sys.modules)
    return rec


def run_child(phase: str, data: str, home: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, "--data", data, "--home", home,
           "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{phase} run of {data} failed:\n{out.stderr[-4000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["process_s"] = wall
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["ml-100k", "ml-1m"])
    p.add_argument("--out", help="append one JSON line per data set here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", choices=("cold", "cached"), help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for data in args.data:
        with tempfile.TemporaryDirectory(prefix="bench-text-") as home:
            load_before = os.getloadavg()
            cold = run_child("cold", data, home, args)
            cached = run_child("cached", data, home, args)
            load_after = os.getloadavg()
        rec = {"bench": "text_vectors", "data": data, "model": "all-MiniLM-L6-v2", "date":
               datetime.datetime.now().isoformat(timespec="seconds"), **machine_info("cpu"),
               "load_avg_before": [round(x, 2) for x in load_before],
               "load_avg_after": [round(x, 2) for x in load_after], "torch_threads": cold["threads"],
               "torch": cold["torch"], "batch_size": args.batch_size, "items": cold["items"],
               "distinct_texts": cold["distinct_texts"], "item_texts_s": round(cold["item_texts_s"], 3),
               "load_s": round(cold["load_s"], 2), "embed_s": round(cold["embed_s"], 2),
               "cold_s": round(cold["cold_s"], 2), "texts_per_s": round(cold["distinct_texts"] / cold["embed_s"], 1),
               "load_cpu_s": round(cold["load_cpu_s"], 2), "embed_cpu_s": round(cold["embed_cpu_s"], 2),
               "texts_per_cpu_s": round(cold["distinct_texts"] / cold["embed_cpu_s"], 1),
               "cached_vectors_s": round(cached["vectors_s"], 3), "cached_s": round(cached["cached_s"], 3),
               "cached_process_s": round(cached["process_s"], 2),
               "cached_loaded_encoder": cached["encoder_loaded"] or cached["sentence_transformers_imported"],
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
        target = TARGETS.get(data)
        rec["ok"] = ((target is None or rec["cold_s"] <= target) and rec["cached_s"] <= CACHED_TARGET
                     and not rec["cached_loaded_encoder"])
        rows.append(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    m = rows[0]
    print(f"{m['cpu']} ({m['cores']} cores, {m['cpu_flags']}), torch {m['torch']}, "
          f"{m['torch_threads']} threads, batch {m['batch_size']}")
    print(f"{'data':8} {'items':>6} {'load s':>7} {'embed s':>8} {'cold s':>7} {'texts/s':>8} {'/cpu-s':>7} "
          f"{'cached s':>9} "
          f"{'(process)':>9} {'encoder?':>8} {'target':>7} {'load avg':>11}")
    for r in rows:
        target = TARGETS.get(r["data"])
        print(f"{r['data']:8} {r['items']:6d} {r['load_s']:7.2f} {r['embed_s']:8.2f} {r['cold_s']:7.2f} "
              f"{r['texts_per_s']:8.1f} {r['texts_per_cpu_s']:7.1f} {r['cached_s']:9.3f} {r['cached_process_s']:9.2f} "
              f"{'LOADED' if r['cached_loaded_encoder'] else 'no':>8} {'-' if target is None else f'<={target:g}s':>7} "
              f"{r['load_avg_before'][0]:5.2f}-{r['load_avg_after'][0]:<5.2f} {'ok' if r['ok'] else 'MISSED'}")


if __name__ == "__main__":
    main()
