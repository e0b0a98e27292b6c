"""Distributed training and the sharded catalogue, under gloo on the CPU.

Each check runs its ranks as spawned processes (:func:`run_ranks`) with a short collective timeout
and a hard limit on the whole group, so a bug fails instead of hanging. Fresh random inputs per
check; every result is compared with the single-process op or run on the same machine.
"""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
GROUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(x):
    """Tensors as numpy arrays, recursively: a tensor put on a queue would be shared memory that dies
    with the process that made it."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy().copy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _tensors(x):
    if hasattr(x, "dtype") and hasattr(x, "shape") and not isinstance(x, torch.Tensor):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tensors(v) for v in x)
    return x


def _entry(fn, rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        out = fn(rank, world, *args)
        queue.put((rank, "ok", _plain(out)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world, *args, timeout=GROUP_TIMEOUT_S):
    """[fn(rank, world, *args) for each rank], each in its own process in one gloo group."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{out}")
            results[rank] = _tensors(out)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


# --------------------------------------------------------------------------- sharded ops


def _ce_cases(rank, world, bounds, seed):
    """Max relative errors of the sharded loss against the single-process op, over several cases."""
    from unirec import ops
    from unirec.distributed import sharded_softmax_cross_entropy

    out = {}
    N = bounds[-1]
    lo, hi = bounds[rank], bounds[rank + 1]
    for case, (dtype, bias, eps, reduction) in enumerate([
            (torch.float32, False, 0.0, "mean"), (torch.float32, True, 0.1, "sum"),
            (torch.float64, True, 0.0, "none"), (torch.float64, False, 0.3, "mean")]):
        g = torch.Generator().manual_seed(seed + case)
        M, D = 23, 12
        hidden = torch.randn(M, D, generator=g, dtype=dtype)
        items = torch.randn(N, D, generator=g, dtype=dtype)
        b = torch.randn(N, generator=g, dtype=dtype) if bias else None
        # a target on every rank, and some ignored rows
        targets = torch.randint(0, N, (M,), generator=g)
        targets[:world] = torch.tensor([bounds[r] for r in range(world)])
        targets[world] = -100
        targets[-1] = N - 1
        w_out = torch.randn(M if reduction == "none" else (), generator=g, dtype=dtype)

        h1 = hidden.clone().requires_grad_()
        i1 = items.clone().requires_grad_()
        b1 = b.clone().requires_grad_() if bias else None
        ref = ops.softmax_cross_entropy(h1, i1, targets, item_bias=b1, reduction=reduction, label_smoothing=eps)
        (ref * w_out).sum().backward()

        h2 = hidden.clone().requires_grad_()
        i2 = items[lo:hi].clone().requires_grad_()
        b2 = b[lo:hi].clone().requires_grad_() if bias else None
        got = sharded_softmax_cross_entropy(h2, i2, targets, offset=lo, item_bias=b2, reduction=reduction,
                                            label_smoothing=eps)
        (got * w_out).sum().backward()

        def rel(a, r, whole):
            """max error over the largest entry of the whole (unsharded) reference tensor"""
            return float((a - r).abs().max() / whole.abs().max().clamp_min(1e-12)) if r.numel() else 0.0

        errs = {"loss": rel(got.detach(), ref.detach(), ref.detach()), "hidden": rel(h2.grad, h1.grad, h1.grad),
                "items": rel(i2.grad, i1.grad[lo:hi], i1.grad)}
        if bias:
            errs["bias"] = rel(b2.grad, b1.grad[lo:hi], b1.grad)
        out[f"case{case}-{dtype}"] = errs
    return out


def _topk_cases(rank, world, bounds, seed):
    """(mismatching index count, max value error, gradient errors) of the sharded top-k per case."""
    from unirec import ops
    from unirec.distributed import sharded_topk_scores

    out = {}
    N = bounds[-1]
    lo, hi = bounds[rank], bounds[rank + 1]
    g = torch.Generator().manual_seed(seed)
    B, D = 9, 8
    # Repeated rows across the shards and integer-valued entries: many exact ties.
    base = torch.randint(-2, 3, (5, D), generator=g).float()
    items = base[torch.randint(0, 5, (N,), generator=g)]
    queries = torch.randint(-2, 3, (B, D), generator=g).float()
    bias = torch.randint(-1, 2, (N,), generator=g).float()
    lens = torch.randint(0, 6, (B,), generator=g)
    ex_off = torch.zeros(B + 1, dtype=torch.int64)
    ex_off[1:] = torch.cumsum(lens, 0)
    ex_idx = torch.randint(0, N, (int(ex_off[-1]),), generator=g)
    for name, k, kw in [("plain", 7, {}), ("bias+exclude", 10, dict(bias=True, exclude=True)),
                        ("k>N", N + 5, dict(exclude=True))]:
        b_full = bias if kw.get("bias") else None
        ex = dict(exclude_offsets=ex_off, exclude_indices=ex_idx) if kw.get("exclude") else {}
        q1 = queries.clone().requires_grad_()
        i1 = items.clone().requires_grad_()
        v1, j1 = ops.topk_scores(q1, i1, k, item_bias=b_full, **ex)
        gv = torch.randn(v1.shape, generator=g)
        (torch.where(j1 >= 0, v1, torch.zeros(())) * gv).sum().backward()
        q2 = queries.clone().requires_grad_()
        i2 = items[lo:hi].clone().requires_grad_()
        v2, j2 = sharded_topk_scores(q2, i2, k, offset=lo, item_bias=None if b_full is None else b_full[lo:hi], **ex)
        (torch.where(j2 >= 0, v2, torch.zeros(())) * gv).sum().backward()
        finite = torch.isfinite(v1)
        out[name] = {
            "index_mismatch": int((j1 != j2).sum()),
            "value_err": float((v1[finite] - v2[finite]).detach().abs().max()) if finite.any() else 0.0,
            "inf_match": bool(torch.equal(finite, torch.isfinite(v2))),
            "dq_err": float((q1.grad - q2.grad).abs().max()),
            "di_err": float((i1.grad[lo:hi] - i2.grad).abs().max()) if hi > lo else 0.0,
        }
    return out


def _fetch_case(rank, world, bounds, seed):
    """Error of rows fetched from their owners and of the gradient sent back."""
    from unirec.distributed import fetch_rows

    g = torch.Generator().manual_seed(seed)
    N, D = bounds[-1], 5
    table = torch.randn(N, D, generator=g)
    # each rank asks for different ids (some ranks none, some repeated)
    ids = [torch.randint(0, N, (3 + 4 * r, 2), generator=g) for r in range(world)]
    ids[world - 1] = ids[world - 1][:0]
    lo, hi = bounds[rank], bounds[rank + 1]
    local = table[lo:hi].clone().requires_grad_()
    got = fetch_rows(local, ids[rank], bounds)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + rank))
    (got * w).sum().backward()
    full = table.clone().requires_grad_()
    for r in range(world):
        wr = torch.randn((*ids[r].shape, D), generator=torch.Generator().manual_seed(seed + r))
        (full[ids[r]] * wr).sum().backward()
    return {"rows": float((got - table[ids[rank]]).abs().max()) if got.numel() else 0.0,
            "grad": float((local.grad - full.grad[lo:hi]).abs().max())}


def _sharded_checks(rank, world, bounds, seed):
    return {"ce": _ce_cases(rank, world, bounds, seed), "topk": _topk_cases(rank, world, bounds, seed),
            "fetch": _fetch_case(rank, world, bounds, seed)}


# unequal shards, an empty-free split with one very small shard, and 3 ranks
SHARDINGS = {2: [0, 7, 41], 3: [0, 19, 21, 40]}


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def sharded_results(request):
    world = request.param
    seed = int(torch.randint(0, 2 ** 30, ()))
    return world, run_ranks(_sharded_checks, world, SHARDINGS[world], seed)


def test_sharded_softmax_cross_entropy_matches_single_process(sharded_results):
    world, results = sharded_results
    for r, res in enumerate(results):
        for case, errs in res["ce"].items():
            for what, e in errs.items():
                assert e < 1e-5, f"rank {r}/{world} {case}: {what} relative error {e:.2e}"


def test_sharded_topk_matches_single_process(sharded_results):
    world, results = sharded_results
    for r, res in enumerate(results):
        for case, errs in res["topk"].items():
            assert errs["index_mismatch"] == 0, f"rank {r}/{world} {case}: top-k indices differ"
            assert errs["inf_match"], f"rank {r}/{world} {case}: the -inf tail differs"
            assert errs["value_err"] < 1e-5 and errs["dq_err"] < 1e-4 and errs["di_err"] < 1e-4, (r, case, errs)


def test_fetch_rows_from_owners(sharded_results):
    world, results = sharded_results
    for r, res in enumerate(results):
        assert res["fetch"]["rows"] == 0.0 and res["fetch"]["grad"] < 1e-5, (r, world, res["fetch"])


def test_shard_bounds_and_merge_in_one_process():
    from unirec.distributed import merge_topk, shard_bounds, sharded_softmax_cross_entropy, sharded_topk_scores
    from unirec import ops

    assert shard_bounds(10, 3) == [0, 4, 7, 10] and shard_bounds(2, 3) == [0, 1, 2, 2]
    v = torch.tensor([[1.0, 3.0, 3.0, float("-inf")], [0.0, -0.0, 2.0, 2.0]])
    i = torch.tensor([[4, 9, 2, -1], [5, 1, 8, 3]])
    mv, mi = merge_topk(v, i, 5)
    assert mi.tolist() == [[2, 9, 4, -1, -1], [3, 8, 1, 5, -1]]
    # one process: the sharded functions are the ops themselves
    h, e, t = torch.randn(6, 4), torch.randn(9, 4), torch.randint(0, 9, (6,))
    torch.testing.assert_close(sharded_softmax_cross_entropy(h, e, t, offset=0), ops.softmax_cross_entropy(h, e, t))
    a, b = sharded_topk_scores(h, e, 3, offset=0), ops.topk_scores(h, e, 3)
    assert torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- data parallel


def _tiny(batch_size, shard_items=False, dropout=0.0, state=None):
    """(model, batches, train config): 48 users (3 global batches of 16), the unified model's parts
    (profile, item attributes, ratings, time, candidates, repeat offsets), seeded alike everywhere."""
    from unirec.data import TokenBuilder, TrainBatches, leave_one_out, synthetic
    from unirec.models import ModelConfig, UniRec
    from unirec.runs import TrainConfig

    ds = synthetic(num_users=48, num_items=70, num_clusters=4, mean_length=14, num_genres=6, seed=3)
    split = leave_one_out(ds)
    torch.manual_seed(0)
    extra = {"shard_items": True} if shard_items else {}
    cfg = ModelConfig(dim=16, num_blocks=1, num_heads=2, dropout=dropout, max_len=12, num_rank_candidates=2,
                      repeat_bias=True, **extra)
    model = UniRec.from_dataset(ds, cfg)
    if state is not None:  # one process's initial weights (a sharded table keeps its rows)
        model.load_state_dict(state)
    builder = TokenBuilder.for_config(split, cfg)
    batches = TrainBatches(builder, batch_size, model.needs_candidates, seed=5)
    tc = TrainConfig(epochs=1, batch_size=batch_size, lr=0.5, warmup_steps=0, grad_clip=0.0, seed=5)
    return model, batches, tc, split


def _first_step_and_sgd(rank, world, batch_size, shard_items=False, state=None, dropout=0.0):
    """(gradients of the first step, parameters after an epoch of 3 SGD steps), as named tensors."""
    from unirec.training import Trainer

    model, batches, tc, _ = _tiny(batch_size, shard_items, dropout, state)
    tr = Trainer(model, batches, tc, progress=False)
    batch = next(iter(batches.epoch(0, rank=tr.rank, world=tr.world)))
    loss, _ = tr.forward(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model, batches, tc, _ = _tiny(batch_size, shard_items, dropout, state)
    tr = Trainer(model, batches, tc, progress=False)
    tr.optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr)
    rec = tr.train_epoch(0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads, params, rec, len(batches)


def _close(a, b, tol):
    """max |a - b| over max |b| (0 for empty)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def test_two_processes_match_one_process_with_the_global_batch():
    ref_grads, ref_params, ref_rec, steps = _first_step_and_sgd(0, 1, 16)
    assert steps == 3
    results = run_ranks(_first_step_and_sgd, 2, 16)
    for r, (grads, params, rec, _) in enumerate(results):
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            assert _close(grads[n], g, 1e-5) < 1e-5, f"rank {r}: gradient of {n}"
        for n, p in ref_params.items():
            assert _close(params[n], p, 1e-5) < 1e-5, f"rank {r}: {n} after 3 SGD steps"
        # the logged losses are those of the global batch
        assert abs(rec["loss"] - ref_rec["loss"]) < 1e-5 * abs(ref_rec["loss"])


def test_two_processes_match_one_process_with_dropout():
    """Dropout 0.3: every process draws the same per-call seeds and the masks are keyed per token by
    (user, history, position), so 2 processes with batch 8 drop what 1 process with batch 16 drops."""
    ref_grads, ref_params, ref_rec, _ = _first_step_and_sgd(0, 1, 16, False, None, 0.3)
    plain_grads = _first_step_and_sgd(0, 1, 16)[0]
    assert max(_close(ref_grads[n], g, 0) for n, g in plain_grads.items()) > 1e-2  # dropout acts
    results = run_ranks(_first_step_and_sgd, 2, 16, False, None, 0.3)
    for r, (grads, params, rec, _) in enumerate(results):
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            assert _close(grads[n], g, 1e-5) < 1e-5, f"rank {r}: gradient of {n}"
        for n, p in ref_params.items():
            assert _close(params[n], p, 1e-5) < 1e-5, f"rank {r}: {n} after 3 SGD steps"
        assert abs(rec["loss"] - ref_rec["loss"]) < 1e-5 * abs(ref_rec["loss"])


def test_sharded_item_table_matches_one_process():
    """shard_items: 2 processes (each half the item table, rows fetched by all-to-all, sharded loss) take the
    same first-step gradients and SGD steps as one process with the whole table."""
    state = _tiny(16, True)[0].state_dict()
    ref_grads, ref_params, ref_rec, _ = _first_step_and_sgd(0, 1, 16, True, state)
    results = run_ranks(_first_step_and_sgd, 2, 16, True, state)
    full = "items.ids.tables.weight"
    for r, (grads, params, rec, _) in enumerate(results):
        lo, hi = [0, 36, 71][r], [0, 36, 71][r + 1]  # shard_bounds(71, 2)
        for n, g in ref_grads.items():
            got, want = grads[n], (g[lo:hi] if n == full else g)
            assert _close(got, want, 1e-5) < 1e-5, f"rank {r}: gradient of {n}"
        for n, p in ref_params.items():
            got, want = params[n], (p[lo:hi] if n == full else p)
            assert _close(got, want, 1e-5) < 1e-5, f"rank {r}: {n} after 3 SGD steps"
        assert abs(rec["loss"] - ref_rec["loss"]) < 1e-5 * abs(ref_rec["loss"])


def test_torchrun_train_sharded_then_resume_in_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m unirec train` with a sharded item table: one run folder, one
    printout, every user evaluated once; the checkpoint of 2 processes resumes in one."""
    import json
    import subprocess
    import sys

    from conftest import SYNTHETIC, TINY_MODEL

    out = tmp_path / "run"
    args = ["-m", "unirec", "train", *SYNTHETIC, *TINY_MODEL, "--set", "shard_items=true", "--threads", "1",
            "--out", str(out), "--results", str(tmp_path / "results.jsonl")]
    env = dict(os.environ, UNIREC_DIST_TIMEOUT=str(COLLECTIVE_TIMEOUT_S))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", *args, "--epochs", "1"],
                         capture_output=True, text=True, env=env, timeout=GROUP_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best epoch") == 1 and two.stdout.count("top 10 recommendations") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["num_users"] == 60 and m["valid"]["num_users"] == 60
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    one = subprocess.run([sys.executable, *args, "--epochs", "2", "--resume"], capture_output=True, text=True,
                         env=env, timeout=GROUP_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["test"]["num_users"] == 60
