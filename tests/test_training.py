"""Training loop: schedule, repeatable seeded runs, checkpoint save/load/resume, run folder."""
import json
import os

import numpy as np
import pytest
import torch

from unirec.data import DataConfig, TokenBuilder, TrainBatches, leave_one_out, synthetic
from unirec.evaluation import evaluate_model
from unirec.models import UniRec, preset
from unirec.runs import Run, RunConfig
from unirec.training import TrainConfig, Trainer, lr_at, train_run


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


def trainer(model, sp, t, run=None):
    tb = TokenBuilder.for_config(sp, model.config)
    return Trainer(model, TrainBatches(tb, t.batch_size, model.needs_candidates, t.seed), t, run,
                   validate=lambda: evaluate_model(model, tb, "valid"), progress=False, log=lambda s: None)


def new_run(path, model, t):
    return Run.create(path, RunConfig(DataConfig("synthetic"), model.config, t))


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, c) == pytest.approx(0.1)
    assert lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(10, 100, c) == pytest.approx(1.0)
    assert lr_at(55, 100, c) == pytest.approx(0.55)
    assert lr_at(100, 100, c) == pytest.approx(0.1)
    lrs = [lr_at(s, 100, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_time_budget_ends_the_schedule_where_it_stops_the_run(split, monkeypatch):
    import types
    import unirec.training.trainer as trainer_module
    clock = iter(np.arange(0.0, 1000.0, 5.0))  # the trainer's clock: 5 s per reading, one reading an epoch
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    t = tc(epochs=20, patience=100, time_budget_s=40.0, lr=1.0, min_lr_ratio=0.1)
    tr = trainer(fresh(split), split, t)
    lrs = []
    tr.optimizer.step = lambda *a, **k: lrs.append(tr.optimizer.param_groups[0]["lr"])
    hist = tr.fit()
    assert len(hist) < 20 and "time budget" in tr.state["stopped"]
    # the schedule ended at the epoch the budget stopped, so the last step ran at the floor, not mid-decay
    assert tr.state["total_steps"] == tr.steps_per_epoch * len(hist)
    assert lrs[-1] == pytest.approx(0.1, abs=0.02) and lrs[len(lrs) // 2] < 0.9
    # without a budget the schedule is the epochs'
    assert trainer(fresh(split), split, tc(epochs=3)).state["total_steps"] == tr.steps_per_epoch * 3


def test_seeded_cpu_runs_repeat_exactly(split):
    outs = []
    for _ in range(2):
        m = fresh(split)
        hist = trainer(m, split, tc()).fit()
        outs.append((predictions(m, split), [h["loss"] for h in hist]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    assert outs[0][1] == outs[1][1]


def test_checkpoint_load_and_resume_give_identical_predictions(split, tmp_path):
    # uninterrupted: 2 epochs (patience high so the best = the last improving epoch)
    a = fresh(split)
    ta = trainer(a, split, tc(), new_run(tmp_path / "a", a, tc()))
    ta.fit()
    # save / load round trip (weights_only loading inside Run.load_model)
    copy = new_run(tmp_path / "copy", a, tc())
    copy.save_model(a)
    loaded = Run.open(tmp_path / "copy").load_model()
    for x, y in zip(predictions(a, split), predictions(loaded, split)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    # interrupted after 1 epoch of the same 2-epoch schedule, then resumed from last.pt
    b = fresh(split)
    tb = trainer(b, split, tc(epochs=2), new_run(tmp_path / "b", b, tc()))
    tb.tc.epochs = 1
    tb.state["total_steps"] = tb.steps_per_epoch * 2  # same schedule as the 2-epoch run
    tb.fit()
    run_b = Run.open(tmp_path / "b")
    c = run_b.load_model()  # best weights so far; resume restores last.pt over them
    c.train()
    tr = trainer(c, split, tc(epochs=2), run_b)
    tr.fit(resume=True)
    assert tr.state["epoch"] == 2 and ta.state["history"][1]["loss"] == tr.state["history"][1]["loss"]
    for x, y in zip(predictions(a, split), predictions(c, split)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_early_stopping_and_run_folder(split, tmp_path):
    data = DataConfig("synthetic", {"num_users": 80, "num_items": 100, "num_clusters": 4, "mean_length": 12,
                                    "seed": 5})
    m = train_run(data, cfg(), tc(epochs=30, patience=1, lr=0.05), tmp_path / "run", progress=False,
                  log=lambda s: None, arm="tiny")
    assert m["epochs_run"] < 30 and "early stop" in m["stopped"]
    for f in ("config.json", "model.json", "model.pt", "last.pt", "metrics.json", "ranks.npz", "training.png"):
        assert (tmp_path / "run" / f).exists(), f
    ranks = np.load(tmp_path / "run" / "ranks.npz")
    assert len(ranks["users"]) == len(ranks["test"]) == m["test"]["num_users"]
    assert np.mean(np.where(ranks["test"] <= 10, 1 / np.log2(ranks["test"] + 1), 0)) == pytest.approx(
        m["test"]["ndcg@10"])
    line = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert line["arm"] == "tiny" and line["data"] == "synthetic" and line["seed"] == 0
    assert line["metrics"]["test"]["ndcg@10"] == m["test"]["ndcg@10"] and line["commit"]
    assert line["protocol"]["test_mask_history"] is True
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["mask_history"] is True and saved["test_unmasked"]["mask_history"] is False
    assert saved["valid"]["stage"] == "valid" and 0 <= saved["test"]["ndcg@10"] <= 1
    assert {"loss", "val_ndcg@10", "tokens_per_s"} <= set(saved["history"][0])
    assert np.isfinite(saved["test"]["rmse"])


def test_select_metric_picks_the_best_epoch_and_names_an_unknown_one(split):
    model = fresh(split)
    t = tc(epochs=4, patience=10, select_metric="hr@10")
    tr = trainer(model, split, t)
    hist = tr.fit()
    hr = [h["val_hr@10"] for h in hist]
    assert tr.state["best_epoch"] == 1 + int(np.argmax(hr)) and tr.state["best_ndcg"] == max(hr)
    with pytest.raises(ValueError, match="select_metric 'ndcg@11'.*expected one of .*hr@10"):
        trainer(fresh(split), split, tc(epochs=1, select_metric="ndcg@11")).fit()


def test_config_sections_reject_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="train config: unknown key 'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="data config: unknown key 'path'"):
        DataConfig.from_dict({"path": "x"})
    with pytest.raises(ValueError, match="run config: unknown key 'modle'"):
        RunConfig.from_dict({"data": {}, "modle": {}})
    with pytest.raises(ValueError, match="model config: unknown key 'dimm'"):
        RunConfig.from_dict({"data": {}, "model": {"dimm": 8}})
    assert DataConfig.from_dict({"source": "synthetic", "kwargs": {"seed": 1}}).options == {"seed": 1}
    c = RunConfig(DataConfig("synthetic", {"seed": 2}), preset("sasrec"), TrainConfig(seed=3), "arm")
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"data": {}, "train": {"lr": 1, "epochz": 2}}))
    with pytest.raises(ValueError, match="config.json: train config: unknown key 'epochz'"):
        Run.open(tmp_path / "r")


def test_atomic_writes_leave_the_old_file_whole(tmp_path):
    from unirec.runs import write_atomic
    f = tmp_path / "x.bin"
    write_atomic(f, lambda fh: fh.write(b"old"))

    def dies(fh):
        fh.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomic(f, dies)
    assert f.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


KILLED_DURING_SAVE = r"""
import os, sys, time, torch
import unirec.runs
from unirec.data import DataConfig
from unirec.models import preset
from unirec.runs import TrainConfig
from unirec.training import train_run

data = DataConfig("synthetic", {"num_users": 80, "num_items": 100, "num_clusters": 4, "mean_length": 12, "seed": 5})
model = preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=16, dropout=0.2)
tc = TrainConfig(epochs=3, batch_size=32, lr=3e-3, warmup_steps=2, patience=5)
real_save, saves = torch.save, []  # saves: the last.pt writes so far


def save_then_stall(obj, f):
    # the epoch-2 last.pt: half of its bytes reach the file, then the process is killed
    if isinstance(obj, dict) and "optimizer" in obj:
        saves.append(1)
    if len(saves) == 2 and "optimizer" in obj:
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print("saving", flush=True)
        time.sleep(600)
    real_save(obj, f)


unirec.runs.torch.save = save_then_stall
train_run(data, model, tc, sys.argv[1], progress=False, log=lambda s: None)
"""


def test_kill_during_save_leaves_the_previous_checkpoint_and_resumes(tmp_path):
    """A process killed in the middle of writing last.pt leaves the previous last.pt whole; training resumes."""
    import subprocess
    import sys
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", KILLED_DURING_SAVE, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "saving"
    finally:
        p.kill()
        p.wait(timeout=60)
    assert list(run_dir.glob(".last.pt.*.tmp")), "the kill should have left a partial temporary file"
    ck = torch.load(run_dir / "last.pt", weights_only=True)  # whole: the epoch-1 state
    assert json.loads(ck["state"])["epoch"] == 1
    data = DataConfig("synthetic", {"num_users": 80, "num_items": 100, "num_clusters": 4, "mean_length": 12,
                                    "seed": 5})
    m = train_run(data, cfg(), tc(epochs=3), run_dir, resume=True, progress=False, log=lambda s: None)
    assert m["epochs_run"] == 3 and [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert json.loads(torch.load(run_dir / "last.pt", weights_only=True)["state"])["epoch"] == 3


def _resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_release_free_memory_returns_freed_heap_pages():
    from unirec.training import trainer
    if trainer._MALLOC_TRIM is None:
        pytest.skip("not glibc")
    # Freeing a 4 MB block raises glibc's mmap threshold past 2 MB, so the 2 MB tensors below come
    # from the heap; the one kept last pins the heap's top, so only a trim can hand the rest back.
    torch.ones(1 << 20)  # freed at once
    blocks = [torch.ones(1 << 19) for _ in range(100)]  # 100 x 2 MB, touched
    keep = blocks[-1]
    del blocks
    before = _resident_mb()
    trainer.release_free_memory()
    after = _resident_mb()
    assert before - after > 100, (before, after)
    assert float(keep.sum()) == 1 << 19
