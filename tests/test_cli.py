"""The unirec command end to end on a tiny synthetic data set, --help, and real MovieLens-100K."""
import json

import pytest
import torch

from unirec.cli import build_parser, main

from conftest import SYNTHETIC, TINY_MODEL


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "2", "--max-len", "16", "--out", str(out)]) == 0
    return out


def test_train_writes_run_and_prints_table_and_top10(run_dir, capsys):
    # output of the fixture's train is captured per test; re-read the run folder instead
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["mask_history"] and not m["test_unmasked"]["mask_history"]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["source"] == "synthetic" and cfg["model"]["dim"] == 16
    assert cfg["model"]["num_rank_candidates"] == 2
    assert (run_dir / "training.png").stat().st_size > 1000


def test_train_output(tmp_path, capsys):
    assert main(["train", *SYNTHETIC, "--epochs", "1", "--dim", "16", "--blocks", "1", "--max-len", "16",
                 "--config", "sasrec", "--out", str(tmp_path / "r"), "--no-progress", "--user", "u3"]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "test unmasked" in out and "popularity" in out
    assert "user u3: last five items" in out and "top 10 recommendations" in out
    assert out.count("(score ") == 10


def test_evaluate_and_recommend(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert ev["test"]["ndcg@10"] == pytest.approx(saved["test"]["ndcg@10"])
    assert main(["recommend", str(run_dir), "--user", "u5", "-k", "7"]) == 0
    out = capsys.readouterr().out
    assert "top 7 recommendations" in out and out.count("(score ") == 7
    assert main(["evaluate", str(run_dir), "--impl", "reference"]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown user"):
        main(["recommend", str(run_dir), "--user", "no-such-user"])


def test_data_info(capsys):
    assert main(["data", "info", *SYNTHETIC]) == 0
    assert "users 60" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["train"], ["evaluate"], ["recommend"], ["tune"], ["data", "info"], []])
def test_help_explains_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = parser
    for c in cmd:
        sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[c]
    for action in sub._actions:
        assert action.help, f"option {action.option_strings or action.dest} of {cmd} has no help"
        for s in action.option_strings:
            assert s in text


def test_movielens_100k_real_data(capsys):
    from unirec.data import FetchError, leave_one_out, load_dataset
    from unirec.evaluation import evaluate_model
    from unirec.models import TokenBuilder, UniRec, preset
    try:
        ds = load_dataset("ml-100k")
    except FetchError as exc:
        pytest.skip(f"MovieLens-100K could not be fetched (offline?): {str(exc).splitlines()[0]}")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    sp = leave_one_out(ds)
    torch.manual_seed(0)
    cfg = preset("unified", dim=16, num_blocks=1, max_len=30)
    m = UniRec.from_dataset(ds, cfg)
    assert cfg.item_feature_names == ["release_year", "class"] and "occupation" in cfg.user_feature_names
    tb = TokenBuilder.for_config(sp, cfg)
    loss, _ = m.loss(tb.train_batch(sp.eval_users[:32], None))
    loss.backward()
    assert torch.isfinite(loss)
    res = evaluate_model(m, tb, "valid")
    assert res["num_users"] == 943 and 0 <= res["ndcg@10"] <= 1
