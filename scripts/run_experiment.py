"""One MovieLens-100K training run of a model preset, for the quality tables in docs/model-results.md.

usage: PYTHONPATH=$PWD python scripts/run_experiment.py NAME PRESET SEED EPOCHS [field=value ...] [train.field=value ...]

Writes the run folder /tmp/model-runs/NAME (override the root with UNIREC_RUNS) and prints one
line "RESULT {json}" with validation / test metrics. ``field=value`` overrides a ModelConfig
field of the preset, ``train.field=value`` a TrainConfig field (values parsed as JSON when possible).
"""
import json
import os
import sys

from unirec.data import DataConfig
from unirec.models import preset, preset_training
from unirec.training import TrainConfig, train_run

out, name, seed, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mo, to = {}, {}
for a in sys.argv[5:]:
    k, v = a.split("=", 1)
    v = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    (to if k.startswith("train.") else mo)[k.removeprefix("train.")] = v
root = os.environ.get("UNIREC_RUNS", "/tmp/model-runs")
m = train_run(DataConfig("ml-100k"), preset(name, **mo), TrainConfig(epochs=epochs, seed=seed, **{**preset_training(name), **to}),
              run_dir=f"{root}/{out}", progress=False)
t, u, v = m["test"], m["test_unmasked"], m["valid"]
print("RESULT", json.dumps(dict(out=out, preset=name, seed=seed, over=mo, train=to, val_ndcg10=v["ndcg@10"],
                                ndcg10=t["ndcg@10"], hr10=t["hr@10"], ndcg10_unmasked=u["ndcg@10"], rmse=t.get("rmse"),
                                auc=t.get("auc"), gauc=t.get("gauc"), best_epoch=m["best_epoch"],
                                epochs_run=m["epochs_run"], secs=round(m["total_seconds"]))))
