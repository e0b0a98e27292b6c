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

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh inputs per test, reproducible: the seed is the test id's hash, shifted by UNIREC_TEST_SEED."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("UNIREC_TEST_SEED", "0"))
    torch.manual_seed(seed)
