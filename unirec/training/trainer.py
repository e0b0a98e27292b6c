"""The training loop: AdamW, linear warm-up then cosine decay (ending at the epoch where the time
budget will stop the run, when it stops it first), gradient clipping, bf16 autocast on CUDA, early
stopping on validation NDCG@10, resumable checkpoints, repeatable seeded CPU runs.

The trainer knows only ``model(batch) -> (loss, parts)``, a batch source (``batches.epoch(e)``,
``len(batches)``) and an optional ``validate() -> metrics``; a :class:`unirec.runs.Run` keeps its
checkpoints.

Repeatability: the batch source orders epoch e's users with ``np.random.default_rng([seed, e])``
(:class:`unirec.data.TrainBatches`) and torch (dropout) is seeded with ``seed * 1_000_003 + e`` at
the epoch's start, in every process alike, so a run resumed from the checkpoint of epoch e continues
exactly as the uninterrupted run (on CPU).

Data parallelism (under torchrun, :mod:`unirec.distributed`): the model is wrapped in
DistributedDataParallel; process r of n trains on the windows r, r + n, ... of each global batch
(``batches.epoch(e, rank=r, world=n)``); each process's loss is its share of the mean over the
global batch and the gradients are summed across processes, so n processes with batch B / n take
the steps of one process with batch B. Only rank 0 prints, shows progress and writes the run
folder; the validation metrics are the same on every rank (the evaluation gathers) and rank 0's
early-stopping state is broadcast, so the processes stop together. Dropout masks do not depend on
the split either (on CPU): every process makes the same dropout calls per step from the same torch
seed, so each call draws the same seed everywhere, and the model keys each token's mask by its user,
its stream's history and its position (:func:`unirec.models.stream.token_keys`), so a user's masks
depend only on (seed, epoch, call, user, history, position). On CUDA dropout is torch's own, not keyed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import time
from typing import Callable, Dict, List, Optional

import torch

from .. import distributed
from ..data import TrainBatches
from ..runs import Run, TrainConfig
from .progress import Progress


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the system (glibc ``malloc_trim``). A CPU step's tensors
    change size with every jagged batch, and glibc keeps the freed pages of such blocks resident, so
    without it the resident memory of a long run grows by megabytes per step though the live memory
    does not (`unirec train --data ml-1m`: 5.7 GB after 15 minutes; trimmed every 8 steps, 1.6 GB at
    the same speed)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``total``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    p = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups (``model.param_groups(weight_decay)``: which parameters
    are decayed is declared by the modules, see :func:`unirec.nn.weight_decay_groups`)."""
    return torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=(0.9, 0.98))


class Trainer:
    """Trains ``model`` on the batches of ``batches``; ``fit()`` returns the per-epoch history.

    ``validate()``: validation metrics with "ndcg@10" and "hr@10" (None: no validation, no early stop).
    With ``run``, it keeps ``model.pt`` (best validation NDCG@10) and ``last.pt`` (resumable state)
    there; ``fit(resume=True)`` continues from ``last.pt``.
    """

    def __init__(self, model, batches: TrainBatches, tc: TrainConfig, run: Optional[Run] = None,
                 validate: Optional[Callable[[], dict]] = None, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.model, self.batches, self.tc = model.to(tc.device), batches, tc
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        self.run, self._validate = run, validate
        self.progress, self.log = progress and self.main, log if self.main else (lambda msg: None)
        self.optimizer = make_optimizer(model, tc)
        self.forward = self._wrap(model)
        # rank 0's run folder decides whether checkpoints are made (every process takes part in one)
        self.saves = bool(distributed.broadcast_object(run is not None))
        self.steps_per_epoch = len(batches)
        # total_steps: the length of the cosine schedule, ``epochs`` unless a time budget ends the run sooner
        self.state = dict(epoch=0, step=0, best_ndcg=-1.0, best_epoch=0, bad_epochs=0, history=[], stopped=None,
                          total_steps=self.steps_per_epoch * tc.epochs)
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self._told_budget = False

    def _wrap(self, model):
        """The module the steps call: the model itself, or under torch.distributed the model in
        DistributedDataParallel with gradients summed (the losses are shares of the global mean)."""
        if self.world == 1:
            return model
        if getattr(model.config, "item_optimizer", None) is not None:
            raise ValueError("item_optimizer updates the item tables inside each process's backward, which "
                             "data parallelism cannot synchronise; train with item_optimizer=None")
        from torch.nn.parallel import DistributedDataParallel
        sharded = model.sharded_parameters() if hasattr(model, "sharded_parameters") else []
        if sharded:
            # each process's own rows of the item table: neither broadcast from rank 0 nor averaged
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        dev = torch.device(self.tc.device)
        ddp = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
        ddp.register_comm_hook(None, distributed.sum_gradients_hook)
        return ddp

    def _checkpoint(self):
        """(model, optimizer) as a checkpoint holds them: with a sharded item table, a stand-in whose
        state is the whole table gathered from every process (all processes call this) and the
        optimizer's state without that table's moments (they restart on resume)."""
        m = self.model
        if self.world == 1 or not getattr(m, "sharded_parameters", lambda: [])():
            return m, self.optimizer
        from types import SimpleNamespace
        state = m.full_state_dict()
        names = {id(p): n for n, p in m.named_parameters()}
        sharded = set(m.sharded_parameters())
        opt = self.optimizer.state_dict()
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt["state"] = {i: v for i, v in opt["state"].items() if names.get(id(order[i])) not in sharded}
        return (SimpleNamespace(state_dict=lambda: state, config=m.config, schema=m.schema),
                SimpleNamespace(state_dict=lambda: opt))

    def _autocast(self):
        if self.tc.device.startswith("cuda") and self.tc.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """One pass over the training users; returns {"loss", "retrieval", ..., "tokens_per_s", "seconds"}."""
        m, tc = self.model, self.tc
        m.train()
        # The same seed in every process: the per-call dropout seeds agree, the masks are keyed per token.
        torch.manual_seed(tc.seed * 1_000_003 + epoch)
        sums: Dict[str, float] = {}
        n = tokens = users = 0
        bar = Progress(self.steps_per_epoch, f"epoch {epoch + 1}/{tc.epochs}", enabled=self.progress)
        for batch in self.batches.epoch(epoch, rank=self.rank, world=self.world):
            batch = batch.to(tc.device)
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(self.state["step"], self.state["total_steps"], tc)
            with self._autocast():
                loss, parts = self.forward(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), tc.grad_clip)
            self.optimizer.step()
            self.state["step"] += 1
            ntok = batch.num_tokens
            tokens += ntok
            users += batch.batch_size
            n += 1
            parts["loss"] = float(loss.detach())
            if self.world > 1:
                # the shares of the processes add up to the global batch's values
                keys = sorted(parts)
                parts = dict(zip(keys, distributed.all_reduce_sum(torch.tensor([parts[k] for k in keys],
                                                                                dtype=torch.float64)).tolist()))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(ntok, parts["loss"])
            if n % 8 == 0:
                release_free_memory()
        secs = bar.elapsed
        out = {k: v / max(n, 1) for k, v in sums.items()}
        if self.world > 1:
            tokens, users = (int(x) for x in distributed.all_reduce_sum(torch.tensor([tokens, users])).tolist())
        out.update(tokens_per_s=tokens / max(secs, 1e-9), users_per_s=users / max(secs, 1e-9), seconds=secs)
        bar.close(f"epoch mean loss {out.get('loss', float('nan')):.4f}, {secs:.1f}s")
        return out

    def _fit_schedule_to_budget(self, elapsed: float, epochs_done: int) -> None:
        """Ends the cosine schedule at the epoch where the time budget will stop the run, when that
        comes before ``epochs``: a run cut by its budget then still finishes at the low learning rate
        instead of being stopped mid-decay. ``elapsed`` seconds (validation included) for the
        ``epochs_done`` epochs of this call of :meth:`fit`; the run stops after the first epoch that
        ends past the budget, so the remaining budget is rounded up to whole epochs."""
        st, tc = self.state, self.tc
        if epochs_done <= 0:
            return
        per_epoch = elapsed / epochs_done
        fit = min(tc.epochs, st["epoch"] + max(1, math.ceil((tc.time_budget_s - elapsed) / per_epoch)))
        if fit < tc.epochs and not self._told_budget:
            self._told_budget = True
            self.log(f"the time budget fits about {fit} of {tc.epochs} epochs: the learning-rate schedule ends "
                     f"there (re-estimated after each epoch)")
        st["total_steps"] = self.steps_per_epoch * fit

    def fit(self, resume: bool = False, on_validation: Optional[Callable[[int, float], None]] = None) -> List[dict]:
        """Trains until ``epochs``, early stopping (``patience`` epochs without a better validation
        ``select_metric``, NDCG@10 by default) or ``time_budget_s``; leaves the best weights in the model.
        ``on_validation(epoch, value)`` is called after each validation with the selection metric's value
        (it may raise to stop)."""
        tc, st = self.tc, self.state
        if resume:
            if self.run is None:
                raise FileNotFoundError("nothing to resume: the trainer has no run folder")
            st.update(self.run.load_training_state(self.model, self.optimizer, tc.device))
            if (self.run.path / "model.pt").exists():
                self.best_state = self.run.load_state("model.pt", tc.device)
            self.log(f"resumed at epoch {st['epoch']} (best validation NDCG@10 {st['best_ndcg']:.4f})")
        t0, first = time.perf_counter(), st["epoch"]
        sel = tc.select_metric
        while st["epoch"] < tc.epochs and st["stopped"] is None:
            e = st["epoch"]
            rec = {"epoch": e + 1, **self.train_epoch(e)}
            release_free_memory()
            if self._validate is not None and ((e + 1) % tc.eval_every == 0 or e + 1 == tc.epochs):
                val = distributed.broadcast_object(self._validate())
                rec["val_ndcg@10"], rec["val_hr@10"] = val["ndcg@10"], val["hr@10"]
                if sel not in val:
                    raise ValueError(f"train config: select_metric {sel!r} is not a validation metric here; "
                                     f"expected one of {', '.join(sorted(k for k in val if '@' in k))}")
                rec[f"val_{sel}"] = val[sel]
                if val[sel] > st["best_ndcg"]:
                    st.update(best_ndcg=val[sel], best_epoch=e + 1, bad_epochs=0)
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    if self.saves:
                        model, _ = self._checkpoint()
                        if self.main:
                            self.run.save_model(model)
                else:
                    st["bad_epochs"] += 1
                chosen = "" if sel == "ndcg@10" else f" {sel} {val[sel]:.4f}"
                self.log(f"epoch {e + 1}: val NDCG@10 {val['ndcg@10']:.4f} HR@10 {val['hr@10']:.4f}{chosen} "
                         f"(best {st['best_ndcg']:.4f} at epoch {st['best_epoch']})")
                if on_validation is not None:
                    on_validation(e + 1, val[sel])
                release_free_memory()
            st["history"].append(rec)
            st["epoch"] = e + 1
            if st["bad_epochs"] >= tc.patience:
                st["stopped"] = f"early stop: no better validation {sel} for {tc.patience} epochs"
            elif tc.time_budget_s is not None:
                elapsed = time.perf_counter() - t0
                if elapsed > tc.time_budget_s:
                    st["stopped"] = f"time budget of {tc.time_budget_s:.0f}s reached"
                else:
                    self._fit_schedule_to_budget(elapsed, st["epoch"] - first)
            # Rank 0 decides (its clock for the time budget): every process continues or stops with it.
            st.update(distributed.broadcast_object({k: st[k] for k in ("stopped", "bad_epochs", "best_ndcg",
                                                                      "best_epoch", "total_steps")}))
            if self.saves:
                model, optimizer = self._checkpoint()
                if self.main:
                    self.run.save_training_state(model, optimizer, st)
        if st["stopped"]:
            self.log(st["stopped"])
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return st["history"]
