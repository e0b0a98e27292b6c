"""A training run end to end, in a run folder.

Layout of ``run_dir``: ``config.json`` (data source, model and training config),
``model_config.json`` + ``model.pt`` (best weights), ``last.pt`` (resumable),
``metrics.json`` (validation and test metrics with the protocol flags, the training
history), ``training.png`` (train loss and validation NDCG@10 per epoch).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data import leave_one_out, load_dataset
from ..evaluation.model_eval import evaluate_model, popularity_baseline
from ..models import TokenBuilder, UniRec, UniRecConfig
from .checkpoint import load_model
from .trainer import TrainConfig, Trainer


def default_run_dir(dataset: str, root: str = "runs") -> Path:
    """./runs/<dataset>-<UTC time>."""
    name = Path(dataset).name if dataset not in ("ml-100k", "synthetic") else dataset
    return Path(root) / f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def load_data(data: dict):
    """The dataset of a run's ``data`` entry: {"source": "ml-100k"|"synthetic"|path, "kwargs": {...}}."""
    return load_dataset(data["source"], **data.get("kwargs", {}))


def plot_history(history, path: Path) -> Optional[Path]:
    """PNG of train loss and validation NDCG@10 per epoch; None (with no file) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(ep, [h["loss"] for h in history], color="tab:blue", marker=".", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ve = [(h["epoch"], h["val_ndcg@10"]) for h in history if "val_ndcg@10" in h]
    if ve:
        ax2.plot(*zip(*ve), color="tab:red", marker=".", label="val NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:red")
    fig.suptitle("unirec training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_run_model(model, split, batch_size: int = 256, device="cpu") -> dict:
    """Validation (masked) and test (masked and unmasked) metrics, plus the popularity floor on test."""
    b = TokenBuilder.for_config(split, model.config)
    return {
        "valid": evaluate_model(model, b, "valid", batch_size=batch_size, device=device),
        "test": evaluate_model(model, b, "test", batch_size=batch_size, device=device),
        "test_unmasked": evaluate_model(model, b, "test", mask_history=False, batch_size=batch_size, device=device),
        "popularity_test": {k: v for k, v in popularity_baseline(split, "test").items() if k != "ranks"},
    }


def train_run(data: dict, model_cfg: UniRecConfig, train_cfg: TrainConfig, run_dir: Optional[Path] = None,
              resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              on_validation: Optional[Callable[[int, float], None]] = None, final_test: bool = True) -> dict:
    """Loads data, trains (or resumes), evaluates, writes the run folder; returns the metrics dict.

    ``on_validation(epoch, val_ndcg10)``: called after each validation (see ``Trainer.fit``).
    ``final_test=False`` evaluates the best model on validation only (hyper-parameter search)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(data["source"])
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    ds = load_data(data)
    split = leave_one_out(ds)
    if resume:
        model = load_model(run_dir, impl=model_cfg.impl) if (run_dir / "model_config.json").exists() else None
        if model is None:
            raise FileNotFoundError(f"nothing to resume in {run_dir}")
    else:
        model = UniRec.from_dataset(ds, model_cfg)
    (run_dir / "config.json").write_text(json.dumps(
        {"data": data, "model": model.config.to_dict(), "train": train_cfg.__dict__}, indent=2))
    log(f"run folder {run_dir}; {ds.name}: {ds.num_users} users, {ds.num_items} items, "
        f"{ds.num_interactions} events; {sum(p.numel() for p in model.parameters()):,} parameters")
    trainer = Trainer(model, split, train_cfg, run_dir, progress=progress, log=log)
    history = trainer.fit(resume=resume, on_validation=on_validation)
    if final_test:
        metrics = evaluate_run_model(model, split, train_cfg.eval_batch_size, train_cfg.device)
    else:
        metrics = {"valid": evaluate_model(model, TokenBuilder.for_config(split, model.config), "valid",
                                           batch_size=train_cfg.eval_batch_size, device=train_cfg.device)}
    metrics.update(best_epoch=trainer.state["best_epoch"], epochs_run=trainer.state["epoch"],
                   stopped=trainer.state["stopped"], history=history,
                   train_seconds=sum(h["seconds"] for h in history), total_seconds=time.perf_counter() - t0,
                   protocol={"split": "leave-one-out by time", "ranking": "full catalogue", "ties": "pessimistic",
                             "valid_mask_history": True, "test_mask_history": True,
                             "test_unmasked_mask_history": False if final_test else None, "like": f"rating >= {model.config.like_threshold}",
                             "selection": "best validation NDCG@10"})
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_history(history, run_dir / "training.png")
    return metrics
