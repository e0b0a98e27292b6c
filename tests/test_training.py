"""Training loop: schedule, repeatable seeded runs, checkpoint save/load/resume, run folder."""
import json

import numpy as np
import pytest
import torch

from unirec.data import leave_one_out, synthetic
from unirec.models import TokenBuilder, UniRec, preset
from unirec.training import TrainConfig, Trainer, load_model, lr_at, save_model, train_run


@pytest.fixture(scope="module")
def split():
    return leave_one_out(synthetic(num_users=80, num_items=100, num_clusters=4, mean_length=12, seed=5))


def cfg():
    return preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=16, dropout=0.2)


def tc(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "patience": 5, **kw})


def predictions(model, sp):
    b = TokenBuilder.for_config(sp, model.config).eval_batch("test", sp.eval_users[:20])
    model.eval()
    p = model.predict(b)
    return p["queries"], p["rating"]


def fresh(sp, seed=0):
    torch.manual_seed(seed)
    return UniRec.from_dataset(sp.dataset, cfg())


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, c) == pytest.approx(0.1)
    assert lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(10, 100, c) == pytest.approx(1.0)
    assert lr_at(55, 100, c) == pytest.approx(0.55)
    assert lr_at(100, 100, c) == pytest.approx(0.1)
    lrs = [lr_at(s, 100, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_seeded_cpu_runs_repeat_exactly(split):
    outs = []
    for _ in range(2):
        m = fresh(split)
        hist = Trainer(m, split, tc(), progress=False, log=lambda s: None).fit()
        outs.append((predictions(m, split), [h["loss"] for h in hist]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    assert outs[0][1] == outs[1][1]


def test_checkpoint_load_and_resume_give_identical_predictions(split, tmp_path):
    # uninterrupted: 2 epochs (patience high so the best = the last improving epoch)
    a = fresh(split)
    ta = Trainer(a, split, tc(), run_dir=tmp_path / "a", progress=False, log=lambda s: None)
    ta.fit()
    # save / load round trip (weights_only loading inside load_model)
    save_model(tmp_path / "copy", a)
    loaded = load_model(tmp_path / "copy")
    for x, y in zip(predictions(a, split), predictions(loaded, split)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    # interrupted after 1 epoch of the same 2-epoch schedule, then resumed from last.pt
    b = fresh(split)
    tb = Trainer(b, split, tc(epochs=2), run_dir=tmp_path / "b", progress=False, log=lambda s: None)
    tb.tc.epochs = 1
    tb.total_steps = tb.steps_per_epoch * 2  # same schedule as the 2-epoch run
    tb.fit()
    c = load_model(tmp_path / "b")  # best weights so far; resume restores last.pt over them
    c.train()
    tr = Trainer(c, split, tc(epochs=2), run_dir=tmp_path / "b", progress=False, log=lambda s: None)
    tr.fit(resume=True)
    assert tr.state["epoch"] == 2 and ta.state["history"][1]["loss"] == tr.state["history"][1]["loss"]
    for x, y in zip(predictions(a, split), predictions(c, split)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_early_stopping_and_run_folder(split, tmp_path):
    data = {"source": "synthetic", "kwargs": {"num_users": 80, "num_items": 100, "num_clusters": 4,
                                             "mean_length": 12, "seed": 5}}
    m = train_run(data, cfg(), tc(epochs=30, patience=1, lr=0.05), tmp_path / "run", progress=False,
                  log=lambda s: None)
    assert m["epochs_run"] < 30 and "early stop" in m["stopped"]
    for f in ("config.json", "model_config.json", "model.pt", "last.pt", "metrics.json", "training.png"):
        assert (tmp_path / "run" / f).exists(), f
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["mask_history"] is True and saved["test_unmasked"]["mask_history"] is False
    assert saved["valid"]["stage"] == "valid" and 0 <= saved["test"]["ndcg@10"] <= 1
    assert {"loss", "val_ndcg@10", "tokens_per_s"} <= set(saved["history"][0])
    assert np.isfinite(saved["test"]["rmse"])
