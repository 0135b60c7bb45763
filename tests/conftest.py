import os
import sys

# MKL's conditional numerical reproducibility: without it a CPU matmul's rounding may depend on memory
# alignment, so the same request could differ in the last bit between processes (the Ray tests compare
# Ray workers' outputs with this process's byte for byte). Set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
