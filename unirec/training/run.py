"""A training run end to end, in a run folder (:class:`unirec.runs.Run`): load the data, build or
resume the model, train, evaluate, write the folder's files and one line of the results file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import distributed
from ..data import DataConfig, TokenBuilder, TrainBatches, cold_item_split, leave_one_out, load_dataset, training_users
from ..evaluation import evaluate_cases, evaluate_cold, evaluate_model, evaluate_split
from ..models import ModelConfig, UniRec
from ..models.objectives import restrict_training_items
from ..models.transfer import FinetuneSpec, build_finetuned, parameter_counts
from ..runs import Run, RunConfig, TrainConfig, default_run_dir, open_base, write_atomic
from .trainer import Trainer

PROTOCOL = {"split": "leave-one-out by time", "ranking": "full catalogue", "ties": "pessimistic",
            "valid_mask_history": True, "test_mask_history": True, "test_unmasked_mask_history": False,
            "selection": "best validation NDCG@10"}
COLD_PROTOCOL = {"split": "cold items: the items first rated latest never train; one third validate, the rest test",
                 "ranking": "full catalogue", "ties": "pessimistic", "cold_valid_mask_history": True,
                 "cold_test_mask_history": True, "training_softmax": "warm items only",
                 "selection": "best cold-validation NDCG@10"}


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
    write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return path


def init_from_run(model: UniRec, run_dir) -> tuple:
    """Copies into ``model`` every parameter and buffer of ``run_dir``'s best weights (model.pt) whose
    name and shape match; returns (copied, the model's count). ValueError when nothing matches (a
    folder of another model kind, or of another data set whose tables all differ)."""
    state = Run.open(run_dir).load_state("model.pt")
    own = model.state_dict()
    match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not match:
        raise ValueError(f"--init {run_dir}: none of its {len(state)} weights matches this model's names and shapes")
    model.load_state_dict(match, strict=False)
    return len(match), len(own)


def train_run(data: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Optional[Path] = None,
              resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              on_validation: Optional[Callable[[int, float], None]] = None, final_test: bool = True,
              impl: str = "auto", arm: Optional[str] = None, results_file: Optional[Path] = None,
              finetune: Optional[FinetuneSpec] = None) -> dict:
    """Loads data, trains (or resumes), evaluates, writes the run folder; returns the metrics dict.

    ``on_validation(epoch, val_ndcg10)``: called after each validation (see ``Trainer.fit``).
    ``final_test=False`` evaluates the best model on validation only (hyper-parameter search) and
    appends no result line. ``impl``: the kernel backend of every op (not saved with the run).
    ``arm``: the name of the run in the results file (default: the folder's name).
    ``finetune``: fine-tune the base run it names (:mod:`unirec.models.transfer`) instead of starting
    fresh: the model is the base's, transferred to ``data`` and set up for the method; the folder keeps
    only what trains. ``train_cfg.user_share`` < 1 trains on that share of the users
    (:func:`unirec.data.training_users`); every user is still evaluated.

    Under torch.distributed (:func:`unirec.distributed.init_from_env`) every process calls it: they
    train data-parallel (:class:`Trainer`), evaluate their parts of the users, and rank 0 alone
    fetches the data first, writes the run folder and logs; every process returns the same metrics.

    ``train_cfg.split == "cold-items"`` runs the cold-item protocol (docs/protocol.md, "Cold items";
    :class:`unirec.data.ColdItemSplit`): training on the warm events with the cold items left out of the
    retrieval softmax, model selection on the cold validation cases; the metrics are {"cold_valid",
    "cold_test", "num_cases", "num_cold_items", "cold_split", ...} and ranks.npz holds per-case ranks.
    """
    t0 = time.perf_counter()
    main = distributed.is_main()
    if not main:
        log = lambda msg: None  # noqa: E731
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(data)
    torch.manual_seed(train_cfg.seed)
    if not main:
        distributed.barrier()  # rank 0 fetches the data set into the cache first
    ds = load_dataset(data)
    if main:
        distributed.barrier()
    cold = train_cfg.split == "cold-items"
    if cold:
        cold_split = cold_item_split(ds, train_cfg.cold_share, train_cfg.cold_seed)
        train_split = cold_split.train
    else:
        split = train_split = leave_one_out(ds)
    transfer = None
    if resume:
        run = Run.open(run_dir)
        if run.config.finetune is not None:
            raise ValueError(f"{run_dir}: a fine-tuned run does not resume; fine-tune again")
        model = run.load_model(impl)
    elif finetune is not None:
        base = open_base(finetune)
        model, transfer = build_finetuned(base.load_model(impl, merge=False), base.load_dataset(), ds, finetune,
                                          model_cfg, impl)
        log(f"fine-tuning {finetune.base} ({finetune.method}): {transfer['matched_items']} of {ds.num_items} items "
            f"matched a base item, features {transfer['features']}" +
            (f"; starting fresh: {transfer['fresh']}" if transfer["fresh"] else ""))
        run = Run.create(run_dir, RunConfig(data, model.config, train_cfg, arm or "", finetune)) if main else None
    else:
        model = UniRec.from_dataset(ds, model_cfg, impl)
        if train_cfg.init_from:
            n, total = init_from_run(model, train_cfg.init_from)
            log(f"initialised {n} of {total} parameter tensors from {train_cfg.init_from}")
        run = Run.create(run_dir, RunConfig(data, model.config, train_cfg, arm or "")) if main else None
    counts = parameter_counts(model)
    log(f"run folder {run_dir}; {ds.name}: {ds.num_users} users, {ds.num_items} items, "
        f"{ds.num_interactions} events; {counts['total']:,} parameters, {counts['trainable']:,} trained")
    builder = TokenBuilder.for_config(train_split, model.config)
    users = None
    if train_cfg.user_share < 1:
        users = training_users(train_split.train_len, train_cfg.user_share, train_cfg.user_seed)
        log(f"training on {len(users)} users ({train_cfg.user_share:g} of those with training events)")
    batches = TrainBatches(builder, train_cfg.batch_size, model.needs_candidates, train_cfg.seed, train_cfg.windows,
                           train_cfg.augment_data, users, train_cfg.augment_share)

    if cold:
        log(repr(cold_split))
        restrict_training_items(model, torch.from_numpy(cold_split.warm_items()))
        eval_builder = TokenBuilder.for_config(cold_split.full, model.config)
        valid_cases = cold_split.cases("cold_valid")

        def validate():
            return evaluate_cases(model, eval_builder, *valid_cases, stage="cold_valid",
                                  batch_size=train_cfg.eval_batch_size, device=train_cfg.device)
    else:
        if ds.target_items is not None:  # a target domain (unirec.data.domains): its items alone in the softmax
            restrict_training_items(model, torch.from_numpy(ds.target_items).nonzero().view(-1))

        def validate():
            return evaluate_model(model, builder, "valid", batch_size=train_cfg.eval_batch_size,
                                  device=train_cfg.device)

    trainer = Trainer(model, batches, train_cfg, run, validate, progress=progress, log=log)
    history = trainer.fit(resume=resume, on_validation=on_validation)
    if cold:
        metrics, ranks = evaluate_cold(model, cold_split, train_cfg.eval_batch_size, train_cfg.device,
                                       test=final_test)
        summary = cold_split.summary()
        metrics.update(num_cases=summary["num_cases"], num_cold_items=summary["num_cold_items"], cold_split=summary)
    else:
        metrics, ranks = evaluate_split(model, split, train_cfg.eval_batch_size, train_cfg.device, test=final_test)
    if not main:
        distributed.barrier()
        return metrics
    if cold:
        protocol = dict(COLD_PROTOCOL, cold_share=train_cfg.cold_share, cold_seed=train_cfg.cold_seed,
                        like=f"rating >= {model.config.like_threshold}")
        if not final_test:
            protocol.update(cold_test_mask_history=None)
    else:
        protocol = dict(PROTOCOL, like=f"rating >= {model.config.like_threshold}")
        if train_cfg.select_metric != "ndcg@10":
            protocol.update(selection=f"best validation {train_cfg.select_metric}")
        if ds.target_items is not None:
            protocol.update(ranking=f"among the {int(ds.target_items.sum())} target-domain items",
                            split="leave-one-out by time over target-domain events")
        if not final_test:
            protocol.update(test_mask_history=None, test_unmasked_mask_history=None)
    best = trainer.state["best_epoch"]
    metrics.update(best_epoch=best, epochs_run=trainer.state["epoch"],
                   stopped=trainer.state["stopped"], history=history,
                   train_seconds=sum(h["seconds"] for h in history),
                   seconds_to_best=sum(h["seconds"] for h in history if h["epoch"] <= best),
                   total_seconds=time.perf_counter() - t0, parameters=counts, protocol=protocol)
    if transfer is not None:
        metrics["transfer"] = {k: transfer[k] for k in ("matched_items", "num_items", "features", "fresh")}
    if (run_dir / "model.pt").exists():
        metrics["checkpoint_bytes"] = (run_dir / "model.pt").stat().st_size
    run.write_metrics(metrics)
    run.save_ranks(ranks)
    if final_test:
        run.append_result(metrics, metrics["total_seconds"], results_file)
    plot_history(history, run_dir / "training.png")
    distributed.barrier()  # the other processes return once the folder is complete
    return metrics
