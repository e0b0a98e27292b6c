import os
import zlib

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when no GPU is present;
# the flag must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A small synthetic data set and model for the command-line and serving tests.
SYNTHETIC = ["--data", "synthetic", "--synthetic-users", "60", "--synthetic-items", "80", "--synthetic-length", "12"]
TINY_MODEL = ["--dim", "16", "--blocks", "1", "--batch-size", "32", "--no-progress", "--set", "num_rank_candidates=2"]



def tiny(name="unified", **kw):
    """A one-block, 16-wide model config of preset ``name`` (no dropout) for fast model tests."""
    from unirec.models import preset
    return preset(name, **{"dim": 16, "num_blocks": 1, "num_heads": 2, "max_len": 20, "dropout": 0.0, **kw})


def small_split(num_users=120, num_items=150, num_clusters=5, mean_length=15, seed=3):
    """(synthetic data set with planted clusters, its leave-one-out split)."""
    from unirec.data import leave_one_out, synthetic
    ds = synthetic(num_users=num_users, num_items=num_items, num_clusters=num_clusters, mean_length=mean_length,
                   seed=seed)
    return ds, leave_one_out(ds)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh inputs per test, reproducible: the seed is the test id's hash, shifted by UNIREC_TEST_SEED."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("UNIREC_TEST_SEED", "0"))
    torch.manual_seed(seed)
