"""Run folders: what a training run writes, and what evaluation, serving and the CLI read.

A run folder holds:

- ``config.json``: a :class:`RunConfig`, {"arm": name, "data": DataConfig, "model": ModelConfig,
  "train": TrainConfig};
- ``model.json`` + ``model.pt``: the best weights' ModelConfig and DataSchema, and the state dict
  (loaded with ``torch.load(weights_only=True)``);
- ``last.pt``: the resumable training state;
- ``metrics.json``: validation and test metrics, the protocol flags, the training history;
- ``ranks.npz``: per-user ranks of the last evaluation ("users", "valid", "test", "test_unmasked"),
  or, for a cold-item run, per-case ranks ("cold_valid_ids", "cold_valid", "cold_test_ids",
  "cold_test"), the input of ``unirec compare``;
- ``training.png``: loss and validation NDCG@10 per epoch.

Each evaluation also appends one JSON line (arm, data set, seed, protocol, metrics, wall time,
commit) to a results file, ``results.jsonl`` beside the run folder unless told otherwise.

Every file is written to a temporary file, flushed to disk and renamed over the old one, so a
process killed during a save leaves the previous file whole. Folders written before the model was
built from parts (a flat ``model_config.json``) load as they are: their configuration and weights
are converted on reading.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .data import SPLITS, DataConfig, LeaveOneOutSplit, leave_one_out, load_dataset, strict_from_dict
from .models import DataSchema, ModelConfig, UniRec, upgrade_legacy
from .models.transfer import FinetuneSpec, build_finetuned, trained_state
from .models.config import upgrade_flat_config

PathLike = Union[str, Path]
MODEL_FORMAT = 2


@dataclass
class TrainConfig:
    """How a model is trained: optimisation, schedule, early stopping, device (see :mod:`unirec.training`)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    patience: int = 5
    # the validation metric that picks the best epoch and stops early, e.g. "ndcg@10_positive" (NDCG@10
    # over the users whose held-out item is not negatively rated) for a model trained to avoid disliked items
    select_metric: str = "ndcg@10"
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True
    eval_batch_size: int = 256
    eval_every: int = 1
    time_budget_s: Optional[float] = None
    # "last": each user's last max_len training events; "all": every max_len window of long histories;
    # "random": one of those windows per user each epoch
    windows: str = "last"
    # a run folder whose weights the model starts from (matching names and shapes), e.g. a pretrained one
    init_from: Optional[str] = None
    # data augmentation: operator -> rate; every training stream (or the share augment_share of them, drawn
    # per batch and user) also trains as an augmented copy
    augment_data: Optional[dict] = None
    augment_share: float = 1.0
    # the evaluation protocol (docs/protocol.md): "leave-one-out", or "cold-items" (the cold_share of items
    # first rated latest never train; a third of them, drawn with cold_seed, validate, the rest test)
    split: str = "leave-one-out"
    cold_share: float = 0.15
    cold_seed: int = 0
    # train on this share of the users with training events, drawn with user_seed (all users are evaluated)
    user_share: float = 1.0
    user_seed: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"train config: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if isinstance(self.cold_share, bool) or not isinstance(self.cold_share, (int, float)) \
                or not 0.0 < float(self.cold_share) < 1.0:
            raise ValueError(f"train config: cold_share must be a number in (0, 1), got {self.cold_share!r}")
        if isinstance(self.cold_seed, bool) or not isinstance(self.cold_seed, int) or self.cold_seed < 0:
            raise ValueError(f"train config: cold_seed must be an integer >= 0, got {self.cold_seed!r}")
        if isinstance(self.user_share, bool) or not isinstance(self.user_share, (int, float)) \
                or not 0.0 < float(self.user_share) <= 1.0:
            raise ValueError(f"train config: user_share must be a number in (0, 1], got {self.user_share!r}")
        if isinstance(self.augment_share, bool) or not isinstance(self.augment_share, (int, float)) \
                or not 0.0 < float(self.augment_share) <= 1.0:
            raise ValueError(f"train config: augment_share must be a number in (0, 1], got {self.augment_share!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return strict_from_dict(cls, d, "train config")


@dataclass
class RunConfig:
    """Everything a run is made of, the content of its config.json: the data set, the model's
    hyper-parameters, the training settings, and the arm's name in result records. Each section
    rejects unknown keys, naming them."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arm: str = ""
    # a fine-tuned run (`unirec finetune`): its base run and method (unirec.models.transfer.FinetuneSpec)
    finetune: Optional[FinetuneSpec] = None

    def to_dict(self) -> dict:
        d = {"arm": self.arm, "data": self.data.to_dict(), "model": self.model.to_dict(), "train": asdict(self.train)}
        if self.finetune is not None:
            d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"run config: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"arm", "data", "model", "train", "finetune"})
        if unknown:
            raise ValueError(f"run config: unknown key {unknown[0]!r}; known keys: arm, data, finetune, model, train")
        model = d.get("model", {})
        if "num_items" in model:  # the flat model section of folders written by the single-class model
            model = upgrade_flat_config(model)[0]
        else:
            model = ModelConfig.from_dict(model)
        finetune = FinetuneSpec.from_dict(d["finetune"]) if d.get("finetune") is not None else None
        return cls(DataConfig.from_dict(d.get("data", {})), model, TrainConfig.from_dict(d.get("train", {})),
                   d.get("arm") or "", finetune)


def write_atomic(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Writes ``path`` through ``write(file)`` into a temporary file beside it, fsyncs it and renames it
    over ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The rename is durable only once the folder's entry is on disk too.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def write_json(path: PathLike, obj) -> Path:
    return write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def source_commit() -> str:
    """The git commit of the unirec source tree (with "+dirty" for local changes), else "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def weights_sha256(run_dir: PathLike, name: str = "model.pt") -> str:
    """The sha256 (hex) of a run folder's weights file; FileNotFoundError when it has none."""
    import hashlib
    f = Path(run_dir) / name
    if not f.exists():
        raise FileNotFoundError(f"{run_dir}: no {name}; the run has no saved model")
    return hashlib.sha256(f.read_bytes()).hexdigest()


def open_base(spec: FinetuneSpec, where: PathLike = "finetune") -> "Run":
    """The base run of a fine-tuning, after checking that its model.pt is the one ``spec`` names
    (ValueError naming both hashes when it differs, FileNotFoundError when it is gone, ValueError when
    the base is itself fine-tuned)."""
    base = Run.open(spec.base)
    if base.config.finetune is not None:
        raise ValueError(f"{where}: base run {spec.base} is itself fine-tuned; fine-tune from a run of `unirec train`")
    digest = weights_sha256(base.path)
    if digest != spec.base_sha256:
        raise ValueError(f"{where}: base run {spec.base} has model.pt sha256 {digest[:16]}..., but "
                         f"{spec.base_sha256[:16]}... was fine-tuned: the base changed since")
    return base


def default_run_dir(data: DataConfig, root: PathLike = "runs") -> Path:
    """./runs/<data set>-<UTC time>."""
    return Path(root) / f"{data.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


class Run:
    """A run folder (see the module docstring). :meth:`create` starts one, :meth:`open` reads one."""

    def __init__(self, path: PathLike, config: RunConfig):
        self.path, self.config = Path(path), config

    @classmethod
    def create(cls, path: PathLike, config: RunConfig) -> "Run":
        """Makes the folder and writes config.json (the arm's name defaults to the folder's)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not config.arm:
            config.arm = path.name
        write_json(path / "config.json", config.to_dict())
        return cls(path, config)

    @classmethod
    def open(cls, path: PathLike) -> "Run":
        """Reads a run folder written by ``unirec train``; FileNotFoundError / ValueError saying what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json; pass a folder written by `unirec train`")
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or "data" not in raw:
            raise ValueError(f"{path / 'config.json'}: expected an object with a \"data\" section")
        try:
            config = RunConfig.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path / 'config.json'}: {exc}") from None
        return cls(path, config)

    # ------------------------------------------------------------------ configuration

    @property
    def arm(self) -> str:
        return self.config.arm or self.path.name

    @property
    def legacy(self) -> bool:
        """Written before the model was built from parts (read through a conversion)."""
        return not (self.path / "model.json").exists() and (self.path / "model_config.json").exists()

    def model_spec(self):
        """(ModelConfig, DataSchema) of the saved weights."""
        if self.legacy:
            return upgrade_flat_config(json.loads((self.path / "model_config.json").read_text()))
        f = self.path / "model.json"
        if not f.exists():
            raise FileNotFoundError(f"{self.path}: no model.json; the run has no saved model yet")
        spec = json.loads(f.read_text())
        return ModelConfig.from_dict(spec["model"]), DataSchema.from_dict(spec["schema"])

    # ------------------------------------------------------------------ data and model

    def load_dataset(self):
        return load_dataset(self.config.data)

    def load_split(self) -> LeaveOneOutSplit:
        return leave_one_out(self.load_dataset())

    def save_model(self, model: UniRec, name: str = "model.pt") -> Path:
        """Writes the state dict ``name`` and model.json (config and schema); a fine-tuned run's holds only
        the parameters that train (the rest is rebuilt from its base, :meth:`load_model`)."""
        state = trained_state(model) if self.config.finetune is not None else model.state_dict()
        write_atomic(self.path / name, lambda f: torch.save(state, f))
        write_json(self.path / "model.json", {"format": MODEL_FORMAT, "model": model.config.to_dict(),
                                              "schema": model.schema.to_dict()})
        return self.path / name

    def load_state(self, name: str = "model.pt", map_location="cpu") -> dict:
        f = self.path / name
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: the run has no saved model")
        state = torch.load(f, map_location=map_location, weights_only=True)
        if self.legacy:
            state = upgrade_legacy(json.loads((self.path / "model_config.json").read_text()), state)[2]
        return state

    def load_model(self, impl: str = "auto", name: str = "model.pt", map_location="cpu", merge: bool = True) -> UniRec:
        """The saved model in eval mode, on backend ``impl``. A fine-tuned run's is its base run's model
        rebuilt for this run's data (:meth:`base_run`, :func:`unirec.models.transfer.build_finetuned`) with
        the trained parameters loaded over it, LoRA merged into the weights unless ``merge=False``."""
        if self.config.finetune is not None:
            return self._load_finetuned(impl, name, map_location, merge)
        config, schema = self.model_spec()
        model = UniRec(config, schema, impl)
        model.load_state_dict(self.load_state(name, map_location))
        return model.eval()

    def base_run(self) -> "Run":
        """The base run of a fine-tuned run (:func:`open_base`)."""
        if self.config.finetune is None:
            raise ValueError(f"{self.path}: not a fine-tuned run (its config.json has no finetune section)")
        return open_base(self.config.finetune, self.path)

    def _load_finetuned(self, impl, name, map_location, merge) -> UniRec:
        base = self.base_run()
        config, _ = self.model_spec()
        model, report = build_finetuned(base.load_model(impl, map_location=map_location), base.load_dataset(),
                                        self.load_dataset(), self.config.finetune, config, impl)
        state = self.load_state(name, map_location)
        missing = sorted(set(report["trainable"]) - set(state))
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if missing or unexpected:
            raise ValueError(f"{self.path / name}: does not fit the fine-tuned model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        if merge:
            from .nn.lora import merge_lora
            merge_lora(model)
        return model.eval()

    def model_version(self, name: str = "model.pt") -> str:
        """``<folder name>@<first 12 hex digits of the weights' sha256>``."""
        import hashlib
        digest = hashlib.sha256((self.path / name).read_bytes()).hexdigest()[:12]
        return f"{self.path.resolve().name}@{digest}"

    # ------------------------------------------------------------------ training state

    def save_training_state(self, model, optimizer, state: dict, name: str = "last.pt") -> None:
        """The resumable state: model and optimizer state dicts plus plain ``state`` (epoch, history...).
        A fine-tuned run keeps none (it holds only what it trained, and fine-tunes again instead)."""
        if self.config.finetune is not None:
            return
        ck = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": json.dumps(state)}
        write_atomic(self.path / name, lambda f: torch.save(ck, f))

    def load_training_state(self, model, optimizer, map_location="cpu", name: str = "last.pt") -> dict:
        f = self.path / name
        if not f.exists():
            raise FileNotFoundError(f"nothing to resume: no {name} in {self.path}")
        ck = torch.load(f, map_location=map_location, weights_only=True)
        if self.legacy:
            ck["model"] = upgrade_legacy(json.loads((self.path / "model_config.json").read_text()), ck["model"])[2]
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        return json.loads(ck["state"])

    # ------------------------------------------------------------------ results

    def write_metrics(self, metrics: dict) -> Path:
        return write_json(self.path / "metrics.json", metrics)

    def read_metrics(self) -> dict:
        f = self.path / "metrics.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: the run has not been evaluated")
        return json.loads(f.read_text())

    def save_ranks(self, ranks: dict) -> Path:
        """ranks.npz from {"users": [E] ids, "valid" / "test" / "test_unmasked": [E] int64 ranks} (or a cold-item
        run's {"cold_valid_ids": [n] case ids, "cold_valid": [n] ranks, and the same for "cold_test"})."""
        arrays = {k: np.asarray(v) for k, v in ranks.items()}
        return write_atomic(self.path / "ranks.npz", lambda f: np.savez(f, **arrays))

    def append_result(self, metrics: dict, wall_seconds: float, results_file: Optional[PathLike] = None) -> Path:
        """Appends one JSON line for this evaluation to ``results_file`` (default: results.jsonl beside the
        run folder): arm, data set, seed, protocol flags, metrics per stage, wall time, the re-ranking weight
        b of a model with the dislike head (``metrics["dislike_rerank"]``), commit."""
        path = Path(results_file) if results_file is not None else self.path.parent / "results.jsonl"
        record = {
            "arm": self.arm, "run": str(self.path), "data": self.config.data.name,
            "seed": self.config.train.seed, "protocol": metrics.get("protocol"),
            "metrics": {k: v for k, v in metrics.items()
                        if k in ("valid", "test", "test_unmasked", "popularity_test", "cold_valid", "cold_test")},
            "best_epoch": metrics.get("best_epoch"), "wall_seconds": round(float(wall_seconds), 3),
            "seconds_to_best": metrics.get("seconds_to_best"), "parameters": metrics.get("parameters"),
            "user_share": self.config.train.user_share,
            "method": self.config.finetune.method if self.config.finetune is not None else None,
            "dislike_rerank": metrics.get("dislike_rerank"),
            "commit": source_commit(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        line = (json.dumps(record) + "\n").encode()
        # One write of one line in append mode: concurrent runs appending to one file do not interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
