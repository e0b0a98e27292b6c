"""The ``unirec`` command: train, pretrain, finetune, evaluate, compare, recommend, tune, serve, data info.

    unirec train                       # MovieLens-100K, the unified config, ./runs/ml-100k-<time>
    unirec evaluate runs/ml-100k-...   # metrics of a run's best model (+ per-user ranks, a results line)
    unirec compare RUNS_A... -- RUNS_B...   # paired bootstrap interval of the NDCG@10 / HR@10 difference
    unirec recommend runs/ml-100k-... --user 42 -k 10
    unirec finetune runs/ml-1m-... --data ml-100k --method lora   # adapt a trained run to new data
    unirec data info                   # what the data set holds
    unirec tune --config sasrec --trials 16 --out tune-sasrec   # search on validation NDCG@10
    unirec serve runs/ml-100k-...      # HTTP recommendation service on 127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import torch

DATA_HELP = ('data set: "ml-100k" or "ml-1m" (fetched on first use into $UNIREC_HOME, default ~/.cache/unirec), '
             '"synthetic" (planted taste clusters; see --synthetic-*), or a path to RecBole atomic files, '
             'MovieLens files or a CSV/Parquet of user,item,timestamp[,rating] (default: %(default)s)')


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="ml-100k", help=DATA_HELP)
    p.add_argument("--synthetic-users", type=int, default=1000, help="synthetic data: users (default: %(default)s)")
    p.add_argument("--synthetic-items", type=int, default=2000, help="synthetic data: items (default: %(default)s)")
    p.add_argument("--synthetic-length", type=float, default=30.0,
                   help="synthetic data: mean events per user (default: %(default)s)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic data: generator seed (default: %(default)s)")
    p.add_argument("--domain", choices=["A", "B"], default=None,
                   help="one domain of a genre split of the data set (docs/protocol.md, \"Genre domains\"): A = the "
                        "events on items of no action/adventure/sci-fi/thriller/war/western/crime/horror genre; B = "
                        "all events, trained on and ranked among those genres' items only (default: the whole data)")


def _data_config(args):
    from .data import DataConfig
    domain = {"domain": args.domain} if getattr(args, "domain", None) else {}
    if args.data == "synthetic":
        return DataConfig("synthetic", {"num_users": args.synthetic_users, "num_items": args.synthetic_items,
                                        "mean_length": args.synthetic_length, "seed": args.synthetic_seed, **domain})
    return DataConfig(args.data, domain)


def _apply_sets(d: dict, settings: List[str]) -> None:
    """Applies each --set KEY=VALUE to the config dict ``d`` (values parsed as JSON when they are)."""
    for kv in settings:
        if "=" not in kv:
            raise SystemExit(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        d[k] = _parse_value(v)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


IMPLS = ["auto", "cpp", "cuda", "triton", "reference"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block first (the usage is one --help away)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_args(t: argparse.ArgumentParser, PRESETS) -> None:
    """The options of `unirec train` and `unirec pretrain`."""
    _add_data_args(t)
    t.add_argument("--config", default="unified",
                   help=f"model preset ({', '.join(sorted(PRESETS))}; sasrec = the SASRec-equivalent baseline) "
                        "or a JSON file of ModelConfig fields (default: %(default)s)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --set dim=128 --set attention=silu, "
                        "--set 'objectives={\"retrieval\": 1, \"ranking\": 0.2}' (repeatable)")
    t.add_argument("--dim", type=int, help="embedding / hidden width (default: the preset's, 96)")
    t.add_argument("--blocks", type=int, help="Transformer blocks (default: the preset's, 3)")
    t.add_argument("--heads", type=int, help="attention heads (default: the preset's, 2)")
    t.add_argument("--max-len", type=int, help="history tokens per user (default: the preset's, 50 unified / 100 sasrec)")
    t.add_argument("--dropout", type=float, help="dropout (default: the preset's, 0.146 unified / 0.301 sasrec)")
    t.add_argument("--attention", choices=["softmax", "silu"], help="attention kind (silu = HSTU pointwise)")
    t.add_argument("--impl", default="auto", choices=IMPLS,
                   help="kernel backend for every op; reference = pure PyTorch; not saved with the run "
                        "(default: %(default)s)")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: 20; ml-1m: 80)")
    t.add_argument("--batch-size", type=int, default=None, help="users per step (default: 64; ml-1m: 128)")
    t.add_argument("--windows", default=None, choices=["last", "all", "random"],
                   help="training sequences: each user's last --max-len events, or every --max-len window of "
                        "longer histories too, or one of those windows per user each epoch, drawn at random "
                        "(the cost of an epoch of last) (default: last; ml-1m: all)")
    t.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: the preset's tuned value, 2e-3 for a config file)")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default: the preset's tuned value, 0.05 for a config file)")
    t.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default: %(default)s)")
    t.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better validation NDCG@10 (default: 5; ml-1m: 10)")
    t.add_argument("--select", default="ndcg@10", metavar="METRIC",
                   help="validation metric that picks the best epoch and stops early, e.g. ndcg@10_positive "
                        "(users whose held-out item is not negatively rated) (default: %(default)s)")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop training after the epoch that passes this many seconds, so that `unirec train` "
                        "ends within 10 minutes (ml-1m: 45) on a small CPU; when the budget will stop the run "
                        "before --epochs, the learning-rate schedule is fitted to end there; 0 = no limit "
                        "(default: 480; ml-1m: 2400)")
    t.add_argument("--seed", type=int, default=0, help="seed; CPU runs with the same seed repeat exactly "
                                                       "(default: %(default)s)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    t.add_argument("--no-bf16", action="store_true", help="on CUDA, train in float32 instead of bf16 autocast")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--out", default=None, help="run folder (default: ./runs/<dataset>-<UTC time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--user", default=None, help="user id whose top 10 is shown (default: the first user)")
    t.add_argument("--arm", default=None, help="name of the run in the results file (default: the --config name)")
    t.add_argument("--results", default=None, metavar="FILE",
                   help="results file the evaluation's line is appended to (default: results.jsonl beside the "
                        "run folder)")
    t.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    t.add_argument("--objective", action="append", default=[], metavar="NAME=WEIGHT",
                   help="set one training objective's weight in the preset's list, 0 removes it (repeatable): "
                        "retrieval, sampled_retrieval, ranking, contrastive (CL4SRec: two augmented views, "
                        "InfoNCE), duorec (dropout views + same-target positives), cloze (masked items, "
                        "BERT4Rec), attributes (the next item's attributes, after S3Rec); "
                        "e.g. --objective contrastive=0.1")
    t.add_argument("--augment", default=None, metavar="OP=RATE,...",
                   help="the contrastive views' operators and rates, one operator drawn per view: crop (keep "
                        "a RATE share, contiguous), mask (RATE of the events to a mask token), reorder (shuffle "
                        "a window of RATE of the events); e.g. crop=0.6,mask=0.3,reorder=0.2 "
                        "(default: crop=0.6,mask=0.3,reorder=0.6)")
    t.add_argument("--augment-data", default=None, metavar="OP=RATE,...",
                   help="data augmentation: every training stream also trains as an augmented copy, one "
                        "operator drawn per copy among crop, mask, reorder, substitute (RATE of the events "
                        "replaced by their most co-occurring item) and insert (that item inserted after RATE "
                        "of the events); e.g. crop=0.6,substitute=0.2 (default: none)")
    t.add_argument("--augment-share", type=float, default=None, metavar="SHARE",
                   help="with --augment-data: the share of the training streams that get an augmented copy, "
                        "drawn per batch and user (a cheaper epoch; default: 1, every stream)")
    t.add_argument("--text", nargs="?", const="lm", default=None, choices=["lm", "random"],
                   help="fuse each item's text vectors into its representation: lm (all-MiniLM-L6-v2 over the "
                        "item's title, year and genres; needs the text extra), random (a fixed random vector "
                        "per item: the control) (default: off; --text alone: lm)")
    t.add_argument("--text-template", default=None, metavar="TEMPLATE",
                   help="the text of an item from its fields, e.g. \"{title}. Genres: {genre}.\" "
                        "(default: the data set's)")
    t.add_argument("--no-item-ids", action="store_true",
                   help="no item id table: items are their attributes (and text) alone")
    t.add_argument("--split", default=None, choices=["leave-one-out", "cold-items"],
                   help="evaluation protocol: leave-one-out (each user's last events), or cold-items (the "
                        "15%% of items first rated latest never train; every event on them is a test case) "
                        "(default: leave-one-out)")
    t.add_argument("--cold-share", type=float, default=None,
                   help="with --split cold-items: the share of items that are cold (default: 0.15)")
    t.add_argument("--cold-seed", type=int, default=None,
                   help="with --split cold-items: the seed that draws the validation third of the cold items, "
                        "the same for every arm and training seed (default: 0)")
    t.add_argument("--init", default=None, metavar="RUN",
                   help="start from the weights of a run folder (e.g. written by `unirec pretrain`): every "
                        "parameter whose name and shape match is copied, the others start fresh")
    _add_share_args(t)


def _add_share_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS",
                   help="validate every this many epochs (early stopping counts validations) (default: 1)")
    t.add_argument("--user-share", type=float, default=None, metavar="SHARE",
                   help="train on this share (0, 1] of the users, drawn with --user-seed; every user is still "
                        "evaluated (default: 1)")
    t.add_argument("--user-seed", type=int, default=None,
                   help="the seed that draws the --user-share users, the same for every model (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    from .models.config import PRESETS
    from .training.tune import DEFAULT_SPACE
    p = _Parser(prog="unirec", description="A unified Transformer recommender on fused kernels.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--debug", action="store_true", help="on an error, show its Python traceback too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    t = sub.add_parser("train", help="train a model, evaluate it on test, print metrics and a user's top 10",
                       description="Train on a leave-one-out split (early stopping on validation NDCG@10), "
                                   "evaluate the best model on test with history masked and unmasked, write the "
                                   "run folder (config, metrics.json, checkpoint, training.png) and show one "
                                   "user's top 10 with that user's last five items.")
    _add_train_args(t, PRESETS)
    pt = sub.add_parser("pretrain", help="train with self-supervised objectives only, for `train --init`",
                        description="Train the model with self-supervised objectives only (by default the "
                                    "sequence-level contrastive and masked-item objectives; --objective "
                                    "changes them), write a run folder like `unirec train` (its test metrics say "
                                    "how the pretrained model ranks on its own), and start later runs from it "
                                    "with `unirec train --init RUN`.")
    _add_train_args(pt, PRESETS)

    from .models.transfer import METHODS
    ft = sub.add_parser("finetune", help="adapt a trained run to another data set or domain (LoRA, adapters...)",
                        description="Start from a trained run (e.g. on MovieLens-1M), match the new data set's "
                                    "items to its items by title and year (unmatched items start from their "
                                    "attributes and text), and fine-tune with METHOD: full (every parameter), "
                                    "frozen (the item side only), adapter (the text adapter only), lora (low-rank "
                                    "updates of the attention, --lora-ffn also the feed-forward layers), "
                                    "lora+adapter. The run folder holds only the trained weights and its base's "
                                    "hash; evaluate, recommend and serve load base + adapter.")
    ft.add_argument("base", metavar="PRETRAINED_RUN", help="run folder written by `unirec train`")
    _add_data_args(ft)
    ft.add_argument("--method", default="lora", choices=METHODS, help="what trains (default: %(default)s)")
    ft.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / r "
                                                                   "(default: r, a scale of 1)")
    ft.add_argument("--lora-ffn", action="store_true", help="LoRA on the feed-forward layers too")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ModelConfig field of the base that does not change a weight's shape, e.g. "
                         "--set dropout=0.3 --set item_id_dropout=0 (repeatable)")
    ft.add_argument("--impl", default="auto", choices=IMPLS, help="kernel backend (default: %(default)s)")
    for flag, kind, default, text in (
            ("--epochs", int, 20, "maximum epochs"), ("--batch-size", int, None, "users per step (default: the base's)"),
            ("--lr", float, None, "peak AdamW learning rate (default: the base's)"),
            ("--weight-decay", float, None, "AdamW weight decay (default: the base's)"),
            ("--warmup-steps", int, 50, "linear warm-up steps"), ("--patience", int, 5, "early-stopping patience"),
            ("--time-budget", float, 480.0, "stop after the epoch that passes this many seconds; 0 = no limit"),
            ("--seed", int, 0, "seed"), ("--threads", int, None, "torch CPU threads")):
        ft.add_argument(flag, type=kind, default=default, help=text + (" (default: %(default)s)" if default is not None
                                                                      and "default" not in text else ""))
    ft.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    ft.add_argument("--out", default=None, help="run folder (default: ./runs/<dataset>-<UTC time>)")
    ft.add_argument("--arm", default=None, help="name of the run in the results file (default: finetune-METHOD)")
    ft.add_argument("--results", default=None, metavar="FILE", help="results file (default: results.jsonl beside "
                                                                    "the run folder)")
    ft.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    _add_share_args(ft)

    e = sub.add_parser("evaluate", help="evaluate a run's best model on validation and test",
                       description="Recompute a run's metrics (full ranking, history masked and unmasked, "
                                   "rating and like metrics) from its checkpoint and data.")
    e.add_argument("run", help="run folder written by `unirec train`")
    e.add_argument("--impl", default="auto", choices=IMPLS, help="kernel backend (default: %(default)s)")
    e.add_argument("--device", default="cpu", help="device (default: %(default)s)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--results", default=None, metavar="FILE",
                   help="results file the line is appended to (default: results.jsonl beside the run folder)")
    e.add_argument("--no-record", action="store_true",
                   help="write neither RUN/ranks.npz nor a results line (default: both)")
    e.add_argument("--dislike-rerank", type=float, default=None, metavar="B",
                   help="a run trained with the dislike objective: rank its retrieval top rerank_depth by "
                        "score + B log(1 - P(dislike)) (default: the run's dislike_rerank; 0: retrieval order)")
    e.add_argument("--responsiveness", action="store_true",
                   help="also simulate one piece of feedback per test user (a dislike, a neutral event or a "
                        "dismiss of one of their top 10) and report how far the item and its nearest items "
                        "fall and what it costs NDCG@10 (docs/protocol.md, \"Feedback and responsiveness\"; "
                        "under \"responsiveness\" in the results line)")
    e.add_argument("--demotion", type=float, default=None, metavar="STRENGTH",
                   help="dismiss demotion strength of the simulation (default: the service's, 1.5)")

    c = sub.add_parser("compare", help="paired comparison of two arms' runs, user by user",
                       description="The mean difference of test NDCG@10 and HR@10 between arm A and arm B with a "
                                   "paired bootstrap 95%% interval over users and seeds (runs paired by seed), "
                                   "from each run's per-user ranks (RUN/ranks.npz, written by `unirec train` and "
                                   "`unirec evaluate`). Usage: unirec compare RUN_A1 RUN_A2 ... -- RUN_B1 RUN_B2 ...")
    c.add_argument("runs", nargs="+", metavar="RUN", help="arm A's runs")
    c.add_argument("--against", nargs="+", default=[], metavar="RUN",
                   help="arm B's runs (what follows a bare --: RUN_A... -- RUN_B...)")
    c.add_argument("--stage", default="test", choices=["test", "test_unmasked", "valid", "cold_test", "cold_valid"],
                   help="which ranks to compare (default: %(default)s)")
    c.add_argument("--metric", action="append", default=None, metavar="METRIC",
                   help="ndcg@K, hr@K or mrr@K, K <= 20 (repeatable; default: ndcg@10 and hr@10)")
    c.add_argument("--samples", type=int, default=10000, help="bootstrap samples (default: %(default)s)")
    c.add_argument("--names", default="A,B", help="names of the two arms in the table (default: %(default)s)")
    c.add_argument("--users", default="all", choices=["all", "positive", "negative"],
                   help="compare over the users whose held-out item is rated above --negative-max (positive) or "
                        "at most that (negative; hr@10 there is NegHit@10) (default: %(default)s)")
    c.add_argument("--negative-max", type=float, default=2.0,
                   help="highest rating that counts as negative feedback (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")

    r = sub.add_parser("recommend", help="top-k items for a user from a run's model",
                       description="Recommend after all of the user's events (their last five are shown).")
    r.add_argument("run", help="run folder written by `unirec train`")
    r.add_argument("--user", required=True, help="the data set's user id")
    r.add_argument("-k", type=int, default=10, help="how many items (default: %(default)s)")
    r.add_argument("--include-seen", action="store_true", help="allow items the user already has")
    r.add_argument("--impl", default="auto", choices=IMPLS, help="kernel backend (default: %(default)s)")

    u = sub.add_parser("tune", help="search hyper-parameters on validation NDCG@10 (Optuna, resumable)",
                       description="Train one model per trial, choose by validation NDCG@10 only (test is never "
                                   "evaluated), prune trials below the median, keep the study in OUT/study.db so "
                                   "that running the same command again resumes it. Writes OUT/best.json and "
                                   "OUT/best_model_config.json (for `unirec train --config`).")
    _add_data_args(u)
    u.add_argument("--config", default="unified", help=f"preset or ModelConfig JSON file to start from "
                                                       f"({', '.join(sorted(PRESETS))}; default: %(default)s)")
    u.add_argument("--trials", type=int, default=16, help="finished trials in all (default: %(default)s)")
    u.add_argument("--param", action="append", default=[], metavar="FIELD=DIST",
                   help="search FIELD (ModelConfig or training field) over DIST: log:LOW:HIGH, float:LOW:HIGH, "
                        "int:LOW:HIGH or choice:A,B,C; replaces the default space when given (default space: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_SPACE.items()) + ")")
    u.add_argument("--epochs", type=int, default=20, help="maximum epochs per trial (default: %(default)s)")
    u.add_argument("--patience", type=int, default=5, help="early-stopping patience per trial (default: %(default)s)")
    u.add_argument("--seed", type=int, default=0, help="training and sampler seed (default: %(default)s)")
    u.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    u.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    u.add_argument("--out", required=True, help="output folder (the study, trial runs, best config)")
    sv = sub.add_parser("serve", help="HTTP recommendation service with live user events",
                       description="Serve a run's model over HTTP (FastAPI + uvicorn): POST /v1/recommend, "
                                   "POST /v1/events, GET /v1/items/ID/similar, GET /v1/items?q=, "
                                   "GET /v1/users/ID/history, POST /v1/admin/reload, /healthz, /metrics, /docs, "
                                   "and a page to try it at /. Events are stored in SQLite and survive restarts; "
                                   "SIGHUP reloads the run folder.")
    sv.add_argument("run", help="run folder written by `unirec train`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    sv.add_argument("--state-dir", default=None, help="folder of the event store (default: RUN/serving)")
    sv.add_argument("--api-key", default=None,
                   help="require this key in the X-API-Key header of writes, history reads and reloads "
                        "(default: $UNIREC_API_KEY, else none, and POST /v1/admin/reload is off)")
    sv.add_argument("--max-batch", type=int, default=64,
                   help="most recommend requests per model batch; 1 = no batching (default: %(default)s)")
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="longest wait for more requests to fill a batch that starts with an idle model; batches "
                        "form without it under load (default: %(default)s)")
    sv.add_argument("--max-queue", type=int, default=256,
                   help="most recommend requests waiting for the model; more get 429 with Retry-After "
                        "(default: %(default)s)")
    sv.add_argument("--max-latency-ms", type=float, default=50.0,
                   help="a new recommend request gets 429 when the model work ahead of it and its own batch "
                        "would take longer than this (batches timed from the recent ones), or while the oldest "
                        "waiting one has waited this long: under overload the accepted requests are answered "
                        "in about this time and the rest refused at once; set it above a full batch's time "
                        "(default: %(default)s)")
    sv.add_argument("--timeout-ms", type=float, default=1000.0,
                   help="deadline of a recommend request; 503 with Retry-After past it (default: %(default)s)")
    sv.add_argument("--dismiss-demotion", type=float, default=1.5,
                   help="how far items close to a dismissed one fall for that user: this x cosine^2 x the spread "
                        "of the user's scores; 0 = only the dismissed item goes (default: %(default)s)")
    sv.add_argument("--cache-size", type=int, default=10000,
                   help="user states cached, invalidated by the user's events; 0 = none (default: %(default)s)")
    sv.add_argument("--max-body-bytes", type=int, default=256 * 1024,
                   help="larger request bodies get 413 (default: %(default)s)")
    sv.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of the model; the event loop needs a core too (default: %(default)s)")
    sv.add_argument("--impl", default="auto", choices=IMPLS, help="kernel backend (default: %(default)s)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: %(default)s)")

    d = sub.add_parser("data", help="data set commands", description="Data set commands.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", help="data command")
    info = dsub.add_parser("info", help="summarise a data set (counts, lengths, ratings, features)",
                           description="Load (fetching if needed) and summarise a data set.")
    _add_data_args(info)
    return p


# --------------------------------------------------------------------------- helpers


def _title(ds, item: int) -> str:
    text = ds.item_text[item] if ds.item_text is not None else ""
    return f"{text} [{ds.item_vocab[item]}]" if text else f"item {ds.item_vocab[item]}"


def _top_for_user(model, split, user_id: Optional[str], k: int, exclude: bool = True):
    """(user index, last five item ids, [(item, score)] top k) after all the user's events."""
    import numpy as np

    from .data import TokenBuilder
    ds = split.dataset
    u = ds.user_index(user_id) if user_id is not None else int(split.eval_users[0])
    b = TokenBuilder.for_config(split, model.config).user_batch([u], "test")
    s, e = split.user_offsets[u], split.user_offsets[u + 1]
    hist_items = split.items[s:e]
    b.history_items = torch.from_numpy(hist_items.copy())
    b.history_offsets = torch.tensor([0, len(hist_items)])
    if ds.target_items is None:
        vals, idx = model.recommend(b, k, exclude_history=exclude)
        top = [(int(i), float(v)) for i, v in zip(idx[0], vals[0]) if int(i) > 0]
    else:  # a target-domain run: its domain's items alone, as evaluation ranks them
        cands = np.flatnonzero(ds.target_items)
        if exclude:
            cands = cands[~np.isin(cands, hist_items)]
        with torch.no_grad():
            p = model.predict(b)
            s = model.scorer.item_scores(p["queries"], p["item_rep"], torch.from_numpy(cands).view(1, -1),
                                         b.history_items, b.history_offsets)[0]
        vals, order = torch.topk(s, min(k, len(cands)))
        top = [(int(cands[o]), float(v)) for o, v in zip(order.tolist(), vals.tolist())]
    return u, hist_items[-5:], top


def _print_top(split, u, last5, top, out=None) -> None:
    ds, out = split.dataset, out or sys.stdout
    print(f"\nuser {ds.user_vocab[u]}: last five items", file=out)
    for i in last5:
        print(f"    {_title(ds, int(i))}", file=out)
    print(f"top {len(top)} recommendations", file=out)
    for r, (i, s) in enumerate(top, 1):
        print(f"  {r:2d}. {_title(ds, i)}  (score {s:.3f})", file=out)


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from . import distributed
    from .evaluation import format_metrics
    from .models import ModelConfig
    from .models.config import preset_training
    from .runs import Run, default_run_dir
    from .training import TrainConfig, train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Under torchrun: join the process group (gloo on CPU, nccl on CUDA); rank 0 alone prints.
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    d = _model_config(args.config, args.data).to_dict()
    over = {"dim": args.dim, "num_blocks": args.blocks, "num_heads": args.heads, "max_len": args.max_len,
            "dropout": args.dropout, "attention": args.attention}
    d.update({k: v for k, v in over.items() if v is not None})
    if args.text is not None:
        d.update(text=args.text, text_template=args.text_template)
    elif args.text_template is not None:
        raise SystemExit("--text-template needs --text")
    if args.no_item_ids:
        d["use_item_ids"] = False
    _apply_sets(d, args.set)
    if args.command == "pretrain":  # self-supervised objectives only, unless --objective says otherwise
        d["objectives"] = dict(PRETRAIN_OBJECTIVES)
    d["objectives"] = _objective_weights(d["objectives"], args.objective)
    if args.augment is not None:
        d["augment"] = _named_rates(args.augment, "--augment")
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--config / --set: {exc}") from None
    # The data set's defaults (preset_training) where the command line leaves a setting out.
    opt = {"epochs": 20, "batch_size": 64, "time_budget_s": 480.0, "patience": 5,
           **preset_training(args.config, args.data)}
    given = {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "time_budget_s": args.time_budget, "windows": args.windows, "split": args.split,
             "cold_share": args.cold_share, "cold_seed": args.cold_seed, "user_share": args.user_share,
             "user_seed": args.user_seed, "eval_every": args.eval_every}
    opt.update({k: v for k, v in given.items() if v is not None})
    if args.init is not None:
        opt["init_from"] = str(args.init)
    if args.augment_data is not None:
        opt["augment_data"] = _named_rates(args.augment_data, "--augment-data")
    if args.augment_share is not None:
        if args.augment_data is None:
            raise SystemExit("--augment-share needs --augment-data (the operators of the copies)")
        opt["augment_share"] = args.augment_share
    opt["time_budget_s"] = opt["time_budget_s"] or None
    tc = TrainConfig(warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, select_metric=args.select,
                     seed=args.seed, device=device, bf16=not args.no_bf16, **opt)
    data = _data_config(args)
    run_dir = Path(args.out) if args.out else default_run_dir(data)
    arm = args.arm or (args.command == "pretrain") * "pretrain-" + Path(args.config).stem
    try:
        metrics = train_run(data, cfg, tc, run_dir, resume=args.resume, progress=not args.no_progress,
                            impl=args.impl, arm=arm, results_file=args.results)
    finally:
        distributed.shutdown()
    if not distributed.is_main_env():
        return 0
    print()
    print(format_metrics(metrics))
    print(f"\nbest epoch {metrics['best_epoch']} of {metrics['epochs_run']}; "
          f"{metrics['total_seconds']:.0f}s in all; run folder {run_dir}")
    run = Run.open(run_dir)
    model, split = run.load_model(args.impl), run.load_split()
    _print_top(split, *_top_for_user(model, split, args.user, 10))
    return 0


PRETRAIN_OBJECTIVES = {"contrastive": 1.0, "cloze": 1.0}


def cmd_finetune(args) -> int:
    from .evaluation import format_metrics
    from .models import ModelConfig
    from .models.transfer import FinetuneSpec
    from .runs import Run, default_run_dir, weights_sha256
    from .training import TrainConfig, train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    base = Run.open(args.base)
    spec = FinetuneSpec(str(base.path.resolve()), weights_sha256(base.path), args.method, args.lora_rank,
                        args.lora_alpha, args.lora_ffn)
    d = base.model_spec()[0].to_dict()
    _apply_sets(d, args.set)
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--set: {exc}") from None
    bt = base.config.train
    given = {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
             "user_share": args.user_share, "user_seed": args.user_seed, "eval_every": args.eval_every}
    opt = {"batch_size": bt.batch_size, "lr": bt.lr, "weight_decay": bt.weight_decay}  # the base's, unless given
    opt.update({k: v for k, v in given.items() if v is not None})
    tc = TrainConfig(epochs=args.epochs, warmup_steps=args.warmup_steps, patience=args.patience, seed=args.seed,
                     time_budget_s=args.time_budget or None,
                     device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), **opt)
    data = _data_config(args)
    run_dir = Path(args.out) if args.out else default_run_dir(data)
    metrics = train_run(data, cfg, tc, run_dir, progress=not args.no_progress, impl=args.impl,
                        arm=args.arm or f"finetune-{args.method}", results_file=args.results, finetune=spec)
    print()
    print(format_metrics(metrics))
    n = metrics["parameters"]
    print(f"\nbest epoch {metrics['best_epoch']} of {metrics['epochs_run']}; {metrics['total_seconds']:.0f}s in all; "
          f"{n['trainable']:,} of {n['total']:,} parameters trained ({n['trainable'] / n['total']:.1%}); "
          f"run folder {run_dir} ({metrics.get('checkpoint_bytes', 0) / 1e6:.2f} MB of weights)")
    return 0


def _named_rates(text: str, flag: str) -> dict:
    """"a=0.6,b=0.3" -> {"a": 0.6, "b": 0.3} (SystemExit naming ``flag`` when malformed)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise SystemExit(f"{flag} expects NAME=NUMBER[,NAME=NUMBER...], got {part!r}") from None
    return out


def _objective_weights(objectives: dict, settings: List[str]) -> dict:
    """The preset's objectives with each --objective NAME=WEIGHT applied (weight 0 removes NAME)."""
    out = dict(objectives)
    for kv in settings:
        for k, w in _named_rates(kv, "--objective").items():
            if w == 0:
                out.pop(k, None)
            else:
                out[k] = w
    return out


def _model_config(name: str, data: Optional[str] = None):
    """A preset by name (with ``data``'s overrides, see :data:`unirec.models.config.DATA_PRESETS`) or a
    ModelConfig JSON file."""
    from .models import ModelConfig, preset
    from .models.config import PRESETS
    if name in PRESETS:
        return preset(name, data)
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"--config {name!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    try:
        return ModelConfig.from_json(path.read_text())
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--config {name}: {exc}") from None


def cmd_tune(args) -> int:
    from .models.config import preset_training
    from .training import TrainConfig
    from .training.tune import DEFAULT_SPACE, format_trials, tune
    if args.threads:
        torch.set_num_threads(args.threads)
    space = dict(DEFAULT_SPACE)
    if args.param:
        space = {}
        for kv in args.param:
            if "=" not in kv:
                raise SystemExit(f"--param expects FIELD=DIST, got {kv!r}")
            k, v = kv.split("=", 1)
            space[k] = v
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tc = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed, device=device,
                     **{k: v for k, v in preset_training(args.config, args.data).items()
                        if k in ("lr", "weight_decay", "batch_size")})
    result = tune(_data_config(args), _model_config(args.config, args.data), tc, space, args.trials, args.out, seed=args.seed)
    print(format_trials(result))
    t = result["train"]
    print(f"\nbest: trial {result['trial']}, validation NDCG@10 {result['valid_ndcg@10']:.4f}\n"
          f"train it: unirec train --config {Path(args.out) / 'best_model_config.json'} "
          f"--lr {t['lr']:.3g} --weight-decay {t['weight_decay']:.3g}")
    return 0


def _open_run(path: str, impl: str):
    """(Run, model, split) of a run folder (FileNotFoundError / ValueError saying what is wrong)."""
    from .runs import Run
    run = Run.open(path)
    return run, run.load_model(impl), run.load_split()


def cmd_evaluate(args) -> int:
    import time
    from .evaluation import evaluate_split, format_metrics
    t0 = time.perf_counter()
    run, model, split = _open_run(args.run, args.impl)
    tc = run.config.train
    if args.dislike_rerank is not None:
        if "dislike" not in model.objectives:
            raise SystemExit(f"--dislike-rerank: the run {args.run} was not trained with the dislike "
                             "objective (train with --objective dislike=W)")
        model.config.dislike_rerank = args.dislike_rerank
    if tc.split == "cold-items":  # the run's own protocol: its cold cases, not each user's last events
        from .data import cold_item_split
        from .evaluation import evaluate_cold
        metrics, ranks = evaluate_cold(model.to(args.device), cold_item_split(split.dataset, tc.cold_share, tc.cold_seed),
                                       device=args.device)
    else:
        metrics, ranks = evaluate_split(model.to(args.device), split, device=args.device)
    if args.responsiveness:
        from .evaluation.responsiveness import DEFAULT_DISMISS_DEMOTION, format_responsiveness, responsiveness
        demotion = DEFAULT_DISMISS_DEMOTION if args.demotion is None else args.demotion
        metrics["responsiveness"] = responsiveness(model, split, demotion=demotion, device=args.device)
    if not args.no_record:
        run.save_ranks(ranks)
        try:
            metrics["protocol"] = run.read_metrics().get("protocol")
        except FileNotFoundError:
            pass
        if "dislike" in model.objectives:
            metrics["dislike_rerank"] = model.config.dislike_rerank
        run.append_result(metrics, time.perf_counter() - t0, args.results)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_metrics(metrics))
        if "responsiveness" in metrics:
            print("\nresponsiveness (one event on an item of each test user's top 10):")
            print(format_responsiveness(metrics["responsiveness"]))
    return 0


def cmd_compare(args) -> int:
    from .evaluation import compare_runs, format_comparison
    from .evaluation.model_eval import feedback_users
    from .runs import Run
    runs_a, runs_b = args.runs, args.against
    if not runs_a or not runs_b:
        raise SystemExit("compare: give arm A's runs, then --, then arm B's runs (e.g. unirec compare "
                         "runs/a-s0 runs/a-s1 -- runs/b-s0 runs/b-s1)")
    names = (args.names.split(",") + ["A", "B"])[:2]
    only = None
    if args.users != "all":
        if args.stage.startswith("cold"):
            raise SystemExit("compare: --users takes the leave-one-out stages (test, test_unmasked, valid)")
        try:
            only = feedback_users(Run.open(runs_a[0]).load_split(), args.stage.replace("_unmasked", ""),
                                  args.users == "negative", args.negative_max)
        except ValueError as e:
            raise SystemExit(f"compare: --users {args.users}: {e} ({runs_a[0]})") from None
    result = compare_runs(runs_a, runs_b, metrics=tuple(args.metric or ("ndcg@10", "hr@10")), stage=args.stage,
                          num_samples=args.samples, only=only)
    if args.json:
        print(json.dumps(dict(result, users=args.users), indent=2, default=str))
        return 0
    print(f"{args.users} users (held-out item rated {'<=' if args.users == 'negative' else '>'} {args.negative_max:g})"
          if args.users != "all" else "all users")
    print(format_comparison(result, *names, lower_is_better=args.users == "negative"))
    if args.users == "negative":
        print("over these users hr@K is NegHit@K, and lower is better")
    return 0


def cmd_recommend(args) -> int:
    _, model, split = _open_run(args.run, args.impl)
    _print_top(split, *_top_for_user(model, split, args.user, args.k, exclude=not args.include_seen))
    return 0


def cmd_serve(args) -> int:
    import importlib
    import os
    missing = []
    for name in ("fastapi", "uvicorn", "prometheus_client", "pydantic"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"unirec serve needs the serving extra (missing: {', '.join(missing)}): "
                         'pip install -e ".[serve]" in the source tree, or pip install "unirec[serve]"')
    from .serving import serve
    if not (Path(args.run) / "config.json").exists():
        raise SystemExit(f"{args.run}: no config.json; pass a folder written by `unirec train`")
    serve(args.run, args.host, args.port, threads=args.threads, log_level=args.log_level, state_dir=args.state_dir,
          api_key=args.api_key or os.environ.get("UNIREC_API_KEY") or None, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, cache_size=args.cache_size, max_body_bytes=args.max_body_bytes,
          impl=args.impl, max_queue=args.max_queue, max_latency_ms=args.max_latency_ms, timeout_ms=args.timeout_ms,
          dismiss_demotion=args.dismiss_demotion)
    return 0


def cmd_data_info(args) -> int:
    from .data import describe, load_dataset
    print(describe(load_dataset(_data_config(args))))
    return 0


COMMANDS = {"train": cmd_train, "pretrain": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "compare": cmd_compare, "recommend": cmd_recommend,
            "tune": cmd_tune, "serve": cmd_serve, "data": cmd_data_info}


def main(argv: Optional[List[str]] = None) -> int:
    """Runs a command line; returns 0. A user's mistake (a missing or malformed file, an unknown preset or id, a
    bad value) ends in SystemExit("unirec: error: <one line>"), status 1, traceback only under --debug (kept as
    SystemExit so that callers in Python see it too); a bad flag exits 2. Other exceptions are bugs: traceback."""
    from .data import FetchError
    from .data.dataset import UnknownIdError
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a[:1] != "-"), None)  # after global flags such as --debug
    if command == "compare" and "--" in argv:  # argparse would drop the bare -- that separates the arms
        argv[argv.index("--")] = "--against"
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # --help, or a status already chosen
            raise
        err, message = exc, exc.code
    except (ValueError, OSError, FetchError, UnknownIdError) as exc:  # OSError: FileNotFoundError, permissions
        err, message = exc, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if args.debug:
        traceback.print_exception(err)
    raise SystemExit("unirec: error: " + " ".join(str(message).split())) from None  # one line, always


if __name__ == "__main__":
    sys.exit(main())
