import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# One thread: tests use small matrices, and CI machines are often shared (OpenMP oversubscription
# slows small kernels by orders of magnitude).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
