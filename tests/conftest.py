"""Test setup: Triton kernels run under the interpreter on machines without a GPU, and uninitialized memory reads
NaN.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Memory that torch.empty & co. hand out reads NaN (max for integers) in deterministic mode, so an output or a
# gradient that a kernel leaves unwritten fails its test every time, not now and then. warn_only: ops that have no
# deterministic implementation still run.
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
