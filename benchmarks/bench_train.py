"""One training epoch of the unified model on MovieLens-100K (or -1M): the fast impls vs impl="reference".

Both providers train the same model (same initial weights, same batches) for one epoch; only
the ops' backends differ. pytest mode (medians in the benchmark table):

    PYTHONPATH=$PWD python -m pytest benchmarks/bench_train.py --benchmark-only

Script mode (alternating runs, prints seconds per epoch and the ratio):

    PYTHONPATH=$PWD python benchmarks/bench_train.py [--data ml-1m] [--config unified] [--set max_len=200] [--repeats 2]

Two shapes: the preset as tuned (histories cut to its max_len, 50 events) and the same model over
histories of up to 200 events, where attention and the loss carry more of the step.
"""
import argparse
import copy
import json
import time
from typing import Optional

import pytest
import torch

from unirec.data import TokenBuilder, TrainBatches
from unirec.models import UniRec, preset
from unirec.training import TrainConfig, Trainer


def _setup(config: str = "unified", device: str = "cpu", overrides: Optional[dict] = None, data: str = "ml-100k"):
    from unirec.data import FetchError, leave_one_out, load_dataset
    try:
        ds = load_dataset(data)
    except FetchError as exc:
        pytest.skip(f"{data} could not be fetched: {str(exc).splitlines()[0]}")
    split = leave_one_out(ds)
    torch.manual_seed(0)
    base = UniRec.from_dataset(ds, preset(config, **(overrides or {})))
    return split, base


def _epoch_fn(split, base, impl: str, device: str):
    state = copy.deepcopy(base.state_dict())
    tc = TrainConfig(epochs=1, device=device)
    batches = TrainBatches(TokenBuilder.for_config(split, base.config), tc.batch_size, base.needs_candidates, tc.seed)

    def run():
        model = UniRec(base.config, base.schema, impl)
        model.load_state_dict(state)
        return Trainer(model, batches, tc, progress=False, log=lambda s: None).train_epoch(0)
    return run


@pytest.mark.parametrize("max_len", [None, 200], ids=["tuned", "len200"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_train_epoch(benchmark, impl, max_len):
    from conftest import bench_device, measure
    device = bench_device()
    split, base = _setup(device=device, overrides={} if max_len is None else {"max_len": max_len})
    fn = _epoch_fn(split, base, impl, device)
    tokens = sum(int(min(n - 1, base.config.max_len)) for n in split.train_len if n >= 2)
    measure(benchmark, fn, device=device, group=f"train epoch ml-100k unified max_len {base.config.max_len}",
            provider=f"unirec-{impl}", rounds=3, tokens_per_epoch=tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="ml-100k", help="built-in data set, ml-100k or ml-1m (default: %(default)s)")
    ap.add_argument("--config", default="unified", help="model preset (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="epochs per impl, alternating (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ModelConfig field of the preset, e.g. --set max_len=200")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    over = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    split, base = _setup(args.config, args.device, over, args.data)
    fns = {impl: _epoch_fn(split, base, impl, args.device) for impl in ("auto", "reference")}
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[impl].append(time.perf_counter() - t0)
            print(f"{impl:>9}: {times[impl][-1]:.2f}s  loss {out['loss']:.4f}  {out['tokens_per_s']:,.0f} tok/s",
                  flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"epoch (best of {args.repeats}): auto {best['auto']:.2f}s, reference {best['reference']:.2f}s, "
          f"speed-up {best['reference'] / best['auto']:.2f}x  ({args.data}, max_len {base.config.max_len}, "
          f"torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
