import os
import zlib

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when no GPU is present;
# the flag must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh inputs per test, reproducible: the seed is the test id's hash, shifted by UNIREC_TEST_SEED."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("UNIREC_TEST_SEED", "0"))
    torch.manual_seed(seed)
