"""Checkpoints: a state_dict (torch.save) next to a JSON config; loading uses weights_only=True."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..models import UniRec, UniRecConfig

PathLike = Union[str, Path]


def save_model(run_dir: PathLike, model: UniRec, name: str = "model.pt") -> Path:
    """Writes ``model.pt`` (state_dict) and ``model_config.json`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), run_dir / name)
    (run_dir / "model_config.json").write_text(model.config.to_json())
    return run_dir / name


def load_model(run_dir: PathLike, name: str = "model.pt", map_location="cpu",
               impl: Optional[str] = None) -> UniRec:
    """Rebuilds a UniRec from ``run_dir``'s model_config.json and loads ``name`` with weights_only=True."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "model_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a unirec run folder?")
    cfg = UniRecConfig.from_json(cfg_path.read_text())
    if impl is not None:
        cfg.impl = impl
    model = UniRec(cfg)
    model.load_state_dict(torch.load(run_dir / name, map_location=map_location, weights_only=True))
    model.eval()
    return model


def save_training_state(path: PathLike, model, optimizer, state: dict) -> None:
    """The resumable state: model and optimizer state_dicts plus plain ``state`` (epoch, step, history...)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": json.dumps(state)},
               Path(path))


def load_training_state(path: PathLike, model, optimizer, map_location="cpu") -> dict:
    ck = torch.load(Path(path), map_location=map_location, weights_only=True)
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    return json.loads(ck["state"])
