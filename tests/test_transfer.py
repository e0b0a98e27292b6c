"""Transfer and parameter-efficient fine-tuning: LoRA, item matching across data sets, the methods'
trainable parameters, fine-tuned run folders (base by hash, merged serving) and `unirec finetune`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny as tiny_config
from unirec.cli import main
from unirec.data import RawData, Table, TokenBuilder, encode, leave_one_out, training_users
from unirec.data.matching import item_keys, match_items, match_values, matching_feature, normalize_title
from unirec.models.transfer import METHODS, FinetuneSpec, build_finetuned, parameter_counts, trained_state
from unirec.nn.lora import LoRALinear, add_lora
from unirec.runs import Run
from unirec.training.trainer import make_optimizer
from unirec.runs import TrainConfig


def movies(name, films, genre_field="genre", seed=0):
    """A tiny MovieLens-like data set: ``films`` [(title, year or nan, genres)], 12 users rating them."""
    rng = np.random.default_rng(seed)
    ids = [f"{name}{j}" for j in range(len(films))]
    users, items, ts = [], [], []
    for u in range(12):
        for t, j in enumerate(rng.permutation(len(films))[: 4 + u % 4]):
            users.append(f"u{u}")
            items.append(ids[j])
            ts.append(float(t))
    inter = Table({"user_id": np.asarray(users), "item_id": np.asarray(items), "timestamp": np.asarray(ts),
                   "rating": np.full(len(ts), 4.0)},
                  {"user_id": "token", "item_id": "token", "timestamp": "float", "rating": "float"})
    item = Table({"item_id": np.asarray(ids), "movie_title": np.asarray([f[0] for f in films]),
                  "release_year": np.asarray([f[1] for f in films], dtype=np.float64),
                  genre_field: [list(f[2]) for f in films]},
                 {"item_id": "token", "movie_title": "token", "release_year": "float", genre_field: "token_seq"})
    return encode(RawData(name, inter, item, None, text_field="movie_title"))


BASE_FILMS = [("Cape Fear", 1962, ["Thriller"]), ("Cape Fear", 1991, ["Thriller"]), ("Toy Story", 1995, ["Comedy"]),
              ("Heat", 1995, ["Action"]), ("Fargo", 1996, ["Crime", "Drama"]), ("Alien", 1979, ["Horror"]),
              ("Babe", 1995, ["Comedy"]), ("Casino", 1995, ["Drama"])]
TARGET_FILMS = [("Cape Fear", 1991, ["Thriller"]), ("Toy Story", 1995, ["Comedy"]), ("Heat", 1986, ["Action"]),
                ("Fargo", np.nan, ["Crime"]), ("Cape Fear", np.nan, ["Thriller"]), ("New Film", 1997, ["Drama"]),
                ("TOY  story!", 1995, ["Comedy", "Sci-Fi"]), ("Casino", 1995, ["Drama"])]


# --------------------------------------------------------------------------- LoRA


def test_lora_starts_as_its_base_and_rank_zero_is_the_base():
    base = nn.Linear(6, 5)
    x = torch.randn(7, 6)
    for rank in (0, 3):
        layer = LoRALinear.wrap(base, rank)
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
        assert layer.weight is base.weight
    layer = LoRALinear.wrap(base, 3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    want = base(x) + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), want)


def test_lora_merge_unmerge_round_trip():
    torch.manual_seed(1)
    layer = LoRALinear(9, 4, rank=2, alpha=5.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    w0, x = layer.weight.detach().clone(), torch.randn(3, 9)
    y = layer(x)
    layer.merge()
    layer.merge()  # twice is once
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight, w0 + 2.5 * layer.lora_b @ layer.lora_a)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(3, 3, rank=-1)


def test_add_lora_keeps_the_weights_names_and_refuses_no_match():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert add_lora(m, ["2"], rank=2) == ["2"]
    state = m.state_dict()
    assert isinstance(m[2], LoRALinear) and type(m[0]) is nn.Linear
    for k, v in before.items():
        torch.testing.assert_close(state[k], v)
    assert {"2.lora_a", "2.lora_b"} <= set(state)
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(m, ["nothing"], rank=2)


# --------------------------------------------------------------------------- matching


def test_items_match_by_title_and_year_not_by_bare_title():
    base, target = movies("b", BASE_FILMS), movies("t", TARGET_FILMS, genre_field="class")
    assert normalize_title("Toy Story (1995)") == "toy story" == normalize_title("TOY  story!")
    keys = item_keys(base)
    assert keys[0] is None and ("cape fear", 1962) in keys and ("cape fear", 1991) in keys
    m = match_items(base, target)
    bkey = {i: keys[i] for i in range(1, base.num_items + 1)}
    tkeys = item_keys(target)
    got = {tkeys[i]: (bkey[m[i]] if m[i] else None) for i in range(1, target.num_items + 1)}
    assert got[("cape fear", 1991)] == ("cape fear", 1991)          # the year tells the two apart
    assert got[("toy story", 1995)] == ("toy story", 1995)
    assert got[("heat", 1986)] is None                               # another year: another film
    assert got[("fargo", None)] == ("fargo", 1996)                   # no year, a unique title
    assert got[("cape fear", None)] is None                          # no year, an ambiguous title
    assert got[("new film", 1997)] is None
    assert got[("casino", 1995)] == ("casino", 1995)
    assert m[0] == 0 and m.shape == (target.num_items + 1,)
    # genres: "class" in the target stands for "genre" in the base (by shared values); Sci-Fi has no row
    f = target.item_features["class"]
    g = matching_feature(base.item_features, f)
    assert g.name == "genre"
    rows = match_values(g, f)
    for j, v in enumerate(f.vocab):
        if j:
            assert (g.vocab[rows[j]] == v) if v in g.vocab else rows[j] == 0
    # years: each target bucket maps to the base bucket holding its middle
    fy, gy = target.item_features["release_year"], base.item_features["release_year"]
    assert matching_feature(base.item_features, fy) is gy
    assert np.all(match_values(gy, fy)[1:] >= 1) and match_values(gy, fy)[0] == 0


# --------------------------------------------------------------------------- transfer and methods


def tiny(**kw):
    return tiny_config(**{"max_len": 12, "text": "random", **kw})


@pytest.fixture(scope="module")
def pair():
    from unirec.models import UniRec
    base_ds, ds = movies("b", BASE_FILMS), movies("t", TARGET_FILMS, genre_field="class", seed=3)
    torch.manual_seed(0)
    base = UniRec.from_dataset(base_ds, tiny())
    return base, base_ds, ds


def test_transfer_copies_matched_rows_and_zeroes_the_rest(pair):
    base, base_ds, ds = pair
    model, report = build_finetuned(base, base_ds, ds, FinetuneSpec("b", "0", "full"))
    m = match_items(base_ds, ds)
    assert report["matched_items"] == int((m[1:] > 0).sum()) == 5 and report["fresh"] == []
    ids_t, ids_b = model.items.tables.tables, base.items.tables.tables
    wt = ids_t.weight[: int(ids_t.table_offsets[1])]
    wb = ids_b.weight[: int(ids_b.table_offsets[1])]
    for i in range(1, ds.num_items + 1):
        torch.testing.assert_close(wt[i], wb[m[i]] if m[i] else torch.zeros(16))
    torch.testing.assert_close(model.stream.blocks[0].attn.qkv.weight, base.stream.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.items.text.proj, base.items.text.proj)
    assert report["features"] == {"release_year": "release_year", "class": "genre"}


@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_parameters_get_gradients_and_the_optimizer(pair, method):
    base, base_ds, ds = pair
    spec = FinetuneSpec("b", "0", method, lora_rank=2, lora_ffn=True)
    model, report = build_finetuned(base, base_ds, ds, spec)
    want = {n for n, _ in model.named_parameters() if {
        "full": True, "frozen": n.startswith("items."), "adapter": n.startswith("items.sources.1."),
        "lora": ".lora_" in n, "lora+adapter": ".lora_" in n or n.startswith("items.sources.1.")}[method]}
    assert set(report["trainable"]) == want and want
    if spec.uses_lora:
        assert {n for n in want if ".lora_" in n} >= {"stream.blocks.0.attn.qkv.lora_a", "stream.blocks.0.ffn.3.lora_b",
                                                      "items.id_lora.lora_a", "items.id_lora.lora_b"}
    split = leave_one_out(ds)
    batch = next(iter(__import__("unirec.data", fromlist=["TrainBatches"]).TrainBatches(
        TokenBuilder.for_config(split, model.config), 16, model.needs_candidates).epoch(0)))
    model.train()
    # a LoRA update starts at zero through one factor, so the other's first gradient is zero: give both
    # factors a value to see every one move
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b") or n == "items.id_lora.lora_a":
                p.normal_()
    loss, _ = model(batch)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == want
    assert all(p.grad is None for n, p in model.named_parameters() if n not in want)
    opt = make_optimizer(model, TrainConfig())
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in want}
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in want)
    assert set(trained_state(model)) == want


def test_adapter_methods_need_a_text_source(pair):
    from unirec.models import UniRec
    base_ds = pair[1]
    plain = UniRec.from_dataset(base_ds, tiny(text=None))
    with pytest.raises(ValueError, match="no text source"):
        build_finetuned(plain, base_ds, pair[2], FinetuneSpec("b", "0", "adapter"))
    with pytest.raises(ValueError, match="method must be one of"):
        FinetuneSpec("b", "0", "everything")


def test_training_users_is_a_fixed_share():
    lens = np.array([0, 5, 1, 3, 2, 7, 2, 9, 4])
    a, b = training_users(lens, 0.5, 0), training_users(lens, 0.5, 0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 4 and set(a) <= {1, 3, 4, 5, 6, 7, 8}
    assert list(training_users(lens, 1.0)) == [1, 3, 4, 5, 6, 7, 8]


# --------------------------------------------------------------------------- end to end


def test_pretrain_finetune_evaluate_serve_end_to_end(tmp_path):
    syn = ["--data", "synthetic", "--synthetic-users", "60", "--synthetic-items", "50", "--synthetic-length", "10"]
    common = ["--epochs", "2", "--no-progress", "--threads", "1"]
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    main(["train", *syn, "--dim", "16", "--blocks", "1", "--max-len", "12", "--text", "random", *common,
          "--out", str(base_dir)])
    main(["finetune", str(base_dir), *syn[:-2], "--synthetic-length", "8", "--method", "lora+adapter",
          "--lora-rank", "2", "--lora-ffn", "--user-share", "0.5", "--lr", "3e-3", "--batch-size", "16", *common, "--out", str(ft_dir)])
    run = Run.open(ft_dir)
    metrics = json.loads((ft_dir / "metrics.json").read_text())
    assert run.config.finetune.method == "lora+adapter" and run.config.train.user_share == 0.5
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert not (ft_dir / "last.pt").exists()
    saved = torch.load(ft_dir / "model.pt", weights_only=True)
    assert set(saved) == {n for n in saved if ".lora_" in n or n.startswith("items.sources.1.")}
    assert (ft_dir / "model.pt").stat().st_size < 0.5 * (base_dir / "model.pt").stat().st_size
    # merged (serving) and unmerged models agree
    merged, unmerged = run.load_model(merge=True), run.load_model(merge=False)
    split = run.load_split()
    b = TokenBuilder.for_config(split, merged.config).user_batch(split.eval_users[:8], "test")
    pm, pu = merged.predict(b), unmerged.predict(b)
    torch.testing.assert_close(pm["queries"], pu["queries"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pm["item_rep"], pu["item_rep"], atol=1e-5, rtol=0)
    # serving loads base + adapter, LoRA merged into the weights
    from unirec.nn.lora import LoRALinear
    from unirec.serving.engine import load_run
    served, _, version = load_run(ft_dir)
    layers = [m for m in served.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.merged for m in layers) and version.startswith("ft@")
    # a fresh process loads it and evaluates to the recorded metrics
    code = ("import json,sys; from unirec.runs import Run; from unirec.evaluation import evaluate_split; "
            f"r = Run.open({str(ft_dir)!r}); m, _ = evaluate_split(r.load_model(), r.load_split()); "
            "print(json.dumps(m['test']['ndcg@10']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout.strip()) - metrics["test"]["ndcg@10"]) < 1e-6
    # the base changes: the fine-tuned run refuses it, naming the hashes
    state = torch.load(base_dir / "model.pt", weights_only=True)
    state["stream.pos_emb.weight"] += 0.01
    torch.save(state, base_dir / "model.pt")
    with pytest.raises(ValueError, match="base changed"):
        Run.open(ft_dir).load_model()
    with pytest.raises(SystemExit, match="base changed"):
        main(["evaluate", str(ft_dir), "--no-record"])
