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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: with 2 intra-op threads on a busy 2-core machine each op waits on
    thread hand-offs (a 16x16 conv took 30 ms instead of 0.2 ms). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
