"""The copy-engine all-to-all, on what a CPU can check: it imports without CUDA, and bad arguments raise clear errors
before any GPU work. Its data movement and stream order are checked on GPUs by ``tools/gpu_jobs/ce_a2a.py``
(exact equality with ``dist.all_to_all_single``)."""

import os
import subprocess
import sys

import pytest
import torch

from veofast.distributed.copy_engine_a2a import CopyEngineAllToAll, check_send

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA0 = torch.device("cuda", 0)


def test_import_touches_neither_cuda_nor_symmetric_memory():
    code = (
        "import sys, torch\n"
        "import veofast.distributed.copy_engine_a2a\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'torch.distributed._symmetric_memory' not in sys.modules\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "bfloat16"}, TypeError, "dtype must be a torch.dtype"),
        ({"max_bytes": 0}, ValueError, "max_bytes"),
        ({"max_bytes": 1}, ValueError, "at least one element"),  # bf16 elements are 2 bytes
        ({"max_bytes": 1024.0}, ValueError, "max_bytes"),
        ({"max_bytes": True}, ValueError, "max_bytes"),
        ({"timeout_ms": -1}, ValueError, "timeout_ms"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    args = {"group": None, "dtype": torch.bfloat16, "max_bytes": 1024, **kwargs}
    with pytest.raises(error, match=match):
        CopyEngineAllToAll(args.pop("group"), args.pop("dtype"), args.pop("max_bytes"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_constructor_without_cuda_says_so():
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        CopyEngineAllToAll(None, torch.bfloat16, 1 << 20)


def check(send, *, world_size=2, dtype=torch.bfloat16, device=CUDA0, capacity_bytes=1 << 20):
    check_send(send, world_size=world_size, dtype=dtype, device=device, capacity_bytes=capacity_bytes)


@pytest.mark.parametrize(
    ("send", "kwargs", "error", "match"),
    [
        ([[1.0]], {}, TypeError, "torch.Tensor"),
        (torch.zeros(2, 8, dtype=torch.bfloat16), {}, ValueError, r"\(P=2, rows, cols\)"),
        (torch.zeros(3, 5, 8, dtype=torch.bfloat16), {}, ValueError, r"got \(3, 5, 8\)"),
        (torch.zeros(2, 8, 5, dtype=torch.bfloat16).transpose(1, 2), {}, ValueError, "contiguous"),
        (torch.zeros(2, 5, 8), {}, ValueError, "dtype torch.float32.*torch.bfloat16"),
        (torch.zeros(2, 97, 8, dtype=torch.bfloat16), {"capacity_bytes": 3000}, ValueError, "max_bytes >= 3104"),
        (torch.zeros(2, 97, 8, dtype=torch.bfloat16), {}, ValueError, "must be a CUDA tensor.*cpu"),
        (torch.zeros(4, 1, 3, dtype=torch.bfloat16, device="meta"), {"world_size": 4}, ValueError, "CUDA tensor"),
    ],
)
def test_check_send_rejects_bad_sends(send, kwargs, error, match):
    with pytest.raises(error, match=match):
        check(send, **kwargs)


def test_check_send_accepts_a_full_buffer_up_to_the_shape_checks():
    # exactly at capacity, odd rows: every check before the device check passes
    send = torch.zeros(2, 97, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        check(send, capacity_bytes=send.numel() * 2)


def test_ulysses_transport_is_checked_and_needs_cuda_tensors():
    from veofast.distributed.ulysses_comm import InFlight, check_transport

    with pytest.raises(ValueError, match="transport must be one of"):
        check_transport("nvshmem")
    flight = InFlight(None, "async", "copy_engine")
    with pytest.raises(ValueError, match="moves CUDA tensors between GPUs, got a tensor on cpu"):
        flight.start(torch.zeros(2, 3, 4))
