"""Hyper-parameter search: the study picks the best validation trial, resumes, never touches test."""
import json

import pytest

from unirec.cli import main
from unirec.data import DataConfig
from unirec.models import preset
from unirec.training import TrainConfig
from unirec.training.tune import parse_space, tune

pytest.importorskip("optuna")

DATA = DataConfig("synthetic", {"num_users": 50, "num_items": 60, "mean_length": 10, "seed": 1})


def test_parse_space_and_errors():
    sp = parse_space({"lr": "log:1e-4:1e-2", "dim": "choice:16,32", "num_blocks": "int:1:3", "dropout": "float:0:0.5",
                      "attention": "choice:softmax,silu"})
    assert sp["lr"] == ("log", 1e-4, 1e-2) and sp["dim"] == ("choice", [16, 32])
    assert sp["num_blocks"] == ("int", 1, 3) and sp["attention"] == ("choice", ["softmax", "silu"])
    for bad, msg in [({"nope": "float:0:1"}, "'nope' is neither"), ({"lr": "log:0:1"}, "'lr'"),
                     ({"lr": "uniform:0:1"}, "'lr': expected"), ({"dropout": "float:a:b"}, "'dropout'")]:
        with pytest.raises(ValueError, match=msg):
            parse_space(bad)


def test_tune_picks_best_validation_trial_and_resumes(tmp_path):
    base = preset("sasrec", dim=16, num_blocks=1, max_len=12, dropout=0.0)
    tc = TrainConfig(epochs=2, batch_size=32, patience=2)
    space = {"lr": "log:1e-4:3e-2", "dim": "choice:8,16"}
    res = tune(DATA, base, tc, space, 3, tmp_path, seed=0, log=lambda s: None)
    rows = res["trials"]
    assert len(rows) == 3
    finished = [r for r in rows if r["state"] == "complete"]
    assert res["valid_ndcg@10"] == max(r["valid_ndcg@10"] for r in finished)
    best = rows[res["trial"]]
    assert res["model"]["dim"] == best["params"]["dim"] and res["train"]["lr"] == best["params"]["lr"]
    # each trial is a run folder evaluated on validation only
    m = json.loads((tmp_path / f"trial-{res['trial']:03d}" / "metrics.json").read_text())
    assert set(m) >= {"valid"} and "test" not in m and "test_unmasked" not in m
    assert m["valid"]["ndcg@10"] == pytest.approx(res["valid_ndcg@10"])
    # the same call resumes the stored study: no new trials until more are asked for
    again = tune(DATA, base, tc, space, 3, tmp_path, seed=0, log=lambda s: None)
    assert len(again["trials"]) == 3 and again["trial"] == res["trial"]
    more = tune(DATA, base, tc, space, 4, tmp_path, seed=0, log=lambda s: None)
    assert len(more["trials"]) == 4
    cfg = json.loads((tmp_path / "best_model_config.json").read_text())
    assert cfg["dim"] == more["model"]["dim"]


def test_tune_command(tmp_path, capsys):
    assert main(["tune", "--data", "synthetic", "--synthetic-users", "40", "--synthetic-items", "50",
                 "--synthetic-length", "10", "--config", "sasrec", "--trials", "2", "--epochs", "1",
                 "--param", "lr=log:1e-3:1e-2", "--param", "max_len=choice:8,12", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val NDCG@10" in out and "unirec train --config" in out and "--lr" in out
    with pytest.raises(SystemExit, match="'lr'"):
        main(["tune", "--data", "synthetic", "--trials", "1", "--param", "lr=log:-1:1", "--out", str(tmp_path / "x")])
