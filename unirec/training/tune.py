"""Hyper-parameter search on validation NDCG@10: an Optuna study (TPE sampler, median pruning)
kept in SQLite inside the output folder, so an interrupted search resumes where it stopped.

Each trial is a whole training run (``train_run`` with validation only: the test split is
never evaluated during a search). A search space maps a field of :class:`ModelConfig` or
:class:`TrainConfig` to a distribution:

    "log:LOW:HIGH"      log-uniform float        "float:LOW:HIGH"   uniform float
    "int:LOW:HIGH"      uniform integer          "choice:A,B,C"     one of the values (JSON-parsed)

Output folder: ``study.db`` (the study), ``trial-NNN/`` (each trial's run folder),
``best.json`` ({"model": ModelConfig fields, "train": TrainConfig fields, "valid_ndcg@10", "trial"})
and ``best_model_config.json`` (usable as ``unirec train --config``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Dict, List

from ..data import DataConfig
from ..models import ModelConfig
from .run import train_run
from ..runs import TrainConfig, write_atomic, write_json

DEFAULT_SPACE: Dict[str, str] = {
    "lr": "log:5e-4:5e-3",
    "weight_decay": "log:1e-3:0.2",
    "dropout": "float:0.0:0.5",
    "dim": "choice:32,64,96",
    "num_blocks": "choice:1,2,3",
    "max_len": "choice:50,100,200",
}
KINDS = ("log", "float", "int", "choice")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
_MODEL_FIELDS = {f.name for f in fields(ModelConfig)}


def parse_space(specs: Dict[str, str]) -> Dict[str, tuple]:
    """{"lr": "log:1e-4:1e-2", ...} -> {"lr": ("log", 1e-4, 1e-2), "dim": ("choice", [32, 64]), ...}.
    Raises ValueError naming the parameter for an unknown field or a malformed distribution."""
    out = {}
    for name, spec in specs.items():
        if name not in _TRAIN_FIELDS and name not in _MODEL_FIELDS:
            raise ValueError(f"search parameter {name!r} is neither a ModelConfig nor a TrainConfig field")
        kind, _, rest = str(spec).partition(":")
        if kind not in KINDS or not rest:
            raise ValueError(f"search parameter {name!r}: expected one of {', '.join(k + ':...' for k in KINDS)}, "
                             f"got {spec!r}")
        if kind == "choice":
            values = [json.loads(v) if v[:1] in "-0123456789tfn[{\"" else v for v in rest.split(",")]
            out[name] = ("choice", values)
            continue
        try:
            low, high = (float(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"search parameter {name!r}: {kind} needs LOW:HIGH numbers, got {spec!r}") from None
        if not low < high or (kind == "log" and low <= 0):
            raise ValueError(f"search parameter {name!r}: need 0 < LOW < HIGH for log, LOW < HIGH otherwise, got {spec!r}")
        out[name] = (kind, int(low), int(high)) if kind == "int" else (kind, low, high)
    return out


def _suggest(trial, name: str, dist: tuple):
    kind = dist[0]
    if kind == "choice":
        return trial.suggest_categorical(name, dist[1])
    if kind == "int":
        return trial.suggest_int(name, dist[1], dist[2])
    return trial.suggest_float(name, dist[1], dist[2], log=kind == "log")


def tune(data: DataConfig, base_model: ModelConfig, base_train: TrainConfig, space: Dict[str, str], trials: int,
         out_dir, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) a search of ``trials`` finished trials in all; returns best.json's content.

    Args:
        data: the data set; base_model / base_train: the fixed settings.
        space: field -> distribution string (module docstring). seed: the sampler's seed.
    """
    import optuna

    dists = parse_space(space)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="unirec", storage=f"sqlite:///{(out / 'study.db').resolve()}", load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(8, trials // 2))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, base_train.epochs // 4)))

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, d) for name, d in dists.items()}
        model_cfg = ModelConfig.from_dict({**base_model.to_dict(), **{k: v for k, v in params.items()
                                                                     if k in _MODEL_FIELDS}})
        train_cfg = TrainConfig(**{**asdict(base_train), **{k: v for k, v in params.items() if k in _TRAIN_FIELDS}})

        def report(epoch: int, val_ndcg: float) -> None:
            trial.report(val_ndcg, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        m = train_run(data, model_cfg, train_cfg, out / f"trial-{trial.number:03d}", progress=False,
                      log=lambda s: None, on_validation=report, final_test=False)
        val = m["valid"]["ndcg@10"]
        log(f"trial {trial.number:3d}: val NDCG@10 {val:.4f}  {_fmt(params)}")
        return val

    done = [t for t in study.trials if t.state.is_finished()]
    if len(done) < trials:
        log(f"search: {trials - len(done)} trials to run ({len(done)} finished) over {', '.join(dists)}")
        study.optimize(objective, n_trials=trials - len(done), catch=())
    best = study.best_trial
    model_cfg = ModelConfig.from_dict({**base_model.to_dict(), **{k: v for k, v in best.params.items()
                                                                 if k in _MODEL_FIELDS}})
    train_cfg = {**asdict(base_train), **{k: v for k, v in best.params.items() if k in _TRAIN_FIELDS}}
    result = {"model": model_cfg.to_dict(), "train": train_cfg, "valid_ndcg@10": best.value, "trial": best.number,
              "params": best.params, "trials": summarize(study)}
    write_json(out / "best.json", result)
    write_atomic(out / "best_model_config.json", lambda f: f.write(model_cfg.to_json().encode()))
    return result


def summarize(study) -> List[dict]:
    """One row per trial: number, state, validation NDCG@10 (last reported when pruned), params."""
    rows = []
    for t in study.trials:
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else math.nan)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "valid_ndcg@10": value, "params": t.params})
    return rows


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_trials(result: dict) -> str:
    """The search as a table, best first."""
    rows = sorted(result["trials"], key=lambda r: -(r["valid_ndcg@10"] if r["valid_ndcg@10"] == r["valid_ndcg@10"]
                                                     else -1.0))
    lines = [f"{'trial':>5}  {'state':<9} {'val NDCG@10':>11}  params"]
    lines += [f"{r['trial']:>5}  {r['state']:<9} {r['valid_ndcg@10']:>11.4f}  {_fmt(r['params'])}" for r in rows]
    return "\n".join(lines)


__all__ = ["DEFAULT_SPACE", "parse_space", "tune", "summarize", "format_trials"]
