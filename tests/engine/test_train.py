"""End to end on CPU: the embedded default trains with falling loss on 2 processes, writes what it promises,
and a run killed after a checkpoint and resumed with ``load_path auto`` continues with the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dist_launch import REPO, free_port, torchrun

STEPS = ["--train.max_steps", "8", "--train.save_steps", "4", "--train.eval_steps", "4", "--train.eval_batches",
         "1", "--train.deterministic", "true"]


def losses(output_dir):
    """step -> (loss, eval_loss) from metrics.jsonl; a resumed run's later lines win."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = (record["loss"], record.get("eval_loss"))
    return out


def train_command(output_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "tasks/train.py", "configs/moe.yaml", *STEPS,
            "--train.output_dir", str(output_dir), *extra]


@pytest.mark.slow
def test_train_kill_and_resume(tmp_path):
    full = tmp_path / "full"
    torchrun("tasks/train.py", "configs/moe.yaml", *STEPS, "--train.output_dir", str(full), timeout=600)
    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))
    assert reference[8][0] < reference[1][0] - 0.5, reference  # the loss clearly falls
    assert reference[4][1] is not None and reference[8][1] is not None  # evaluation ran
    assert os.path.isfile(full / "config.yaml")
    assert sorted(os.listdir(full / "checkpoints")) == ["global_step_4", "global_step_8"]

    # a run killed (SIGKILL, whole process group) once its step-4 checkpoint is complete ...
    killed = tmp_path / "killed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(train_command(killed), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "global_step_4" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()

    # ... refuses to start over its checkpoints without load_path, and resumes with the same losses
    refused = torchrun("tasks/train.py", "configs/moe.yaml", *STEPS, "--train.output_dir", str(killed),
                       "--train.overwrite_output_dir", "false", check=False, timeout=300)
    assert refused.returncode != 0 and "already holds checkpoints" in refused.stderr
    torchrun("tasks/train.py", "configs/moe.yaml", *STEPS, "--train.output_dir", str(killed),
             "--train.load_path", "auto", timeout=600)
    resumed = losses(killed)
    for step in range(5, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


@pytest.mark.parametrize(
    "override", [["--train.eval_steps", "0"], ["--data.eval_path", "null", "--train.eval_steps", "5"]]
)
def test_evaluation_needs_both_a_path_and_a_period(tmp_path, override):
    """Half an evaluation setup fails at once, saying how to complete it or turn it off."""
    command = [sys.executable, "tasks/train.py", "configs/moe.yaml", "--train.output_dir", str(tmp_path / "out"),
               *override]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "evaluation needs both data.eval_path and train.eval_steps > 0" in proc.stderr
    assert "--data.eval_path null" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
