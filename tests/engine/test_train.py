"""End to end on CPU: the embedded default trains with falling loss on 2 processes, writes what it promises,
and a run killed after a checkpoint and resumed with ``load_path auto`` continues with the same losses."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from dist_launch import REPO, free_port, torchrun

from veofast.checkpoint import find_latest_checkpoint
from veofast.utils.metrics import MetricsWriter

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


def child_pids(pid):
    """The processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(entry))
    return children


def kill_torchrun(proc):
    """SIGKILL a torchrun job: torchrun starts each worker in a session of its own, so killing torchrun's process
    group alone would leave the workers training on."""
    workers = child_pids(proc.pid)
    assert workers, "torchrun has no workers to kill"
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    proc.wait()


def cpu_env():
    """The environment of a training process started here: CPU only, this checkout first on the path."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def train_one_process(output_dir, *extra):
    """``python tasks/train.py configs/moe.yaml`` as one process (world size 1), no torchrun."""
    command = [sys.executable, "tasks/train.py", "configs/moe.yaml", "--train.output_dir", str(output_dir), *extra]
    return subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)


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
    proc = subprocess.Popen(train_command(killed), cwd=REPO, env=cpu_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "global_step_4" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_torchrun(proc)
    assert marker.exists()
    assert not (killed / "checkpoints" / "global_step_8").exists()  # it did die before the end

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
    "override, remedy",
    [
        (["--train.eval_steps", "0"], "--data.eval_path null to train without evaluation"),
        (["--data.eval_path", "null", "--train.eval_steps", "5"], "--train.eval_steps 0 to train without evaluation"),
    ],
)
def test_evaluation_needs_both_a_path_and_a_period(tmp_path, override, remedy):
    """Half an evaluation setup fails at once, saying how to complete it or to turn off the half that is set."""
    proc = train_one_process(tmp_path / "out", *override)
    assert proc.returncode != 0
    assert "evaluation needs both data.eval_path and train.eval_steps > 0" in proc.stderr
    assert remedy in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize("where, message", [("missing", "it does not exist"),
                                            ("run", "it looks like a run's output_dir")])
def test_bad_load_path_fails_before_anything_starts(tmp_path, where, message):
    """A load_path that is not a checkpoint stops the run at once with what is wrong, before it writes anything."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = train_one_process(tmp_path / "out", "--train.load_path", str(tmp_path / where))
    assert proc.returncode != 0
    assert "train.load_path" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_finished_run_and_other_world_size(tmp_path):
    """Resuming a finished run leaves its checkpoint as it is and keeps the earlier config; resuming at another
    world size stops at once, naming both sizes."""
    short = ["--train.max_steps", "2", "--data.eval_path", "null", "--train.eval_steps", "0"]
    out = tmp_path / "out"
    assert train_one_process(out, *short).returncode == 0
    final = out / "checkpoints" / "global_step_2"
    before = (os.stat(final).st_ino, (final / "COMPLETE").read_text())

    again = train_one_process(out, *short, "--train.load_path", "auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (os.stat(final).st_ino, (final / "COMPLETE").read_text()) == before  # not saved over
    assert "nothing to train: resumed at step 2" in again.stderr
    assert (out / "config.1.yaml").is_file()  # the first run's config, load_path null

    wider = torchrun("tasks/train.py", "configs/moe.yaml", *short, "--train.output_dir", str(out),
                     "--train.load_path", "auto", check=False, timeout=300)
    assert wider.returncode != 0
    assert "saved at world size 1 and this run's world size is 2" in wider.stderr, wider.stderr[-2000:]


@pytest.mark.parametrize("output_dir, override, message", [
    ("a_file/out", [], "train.output_dir '{tmp}/a_file/out' cannot be written: '{tmp}/a_file' is not a directory"),
    ("out", ["--data.train_path", "null"], "data.train_path is required"),
    ("out", ["--model.config_overrides.vocab_size", "1000"],
     "model.tokenizer_path 'tokenizers/tiny' has 1024 tokens but the model's vocab_size is 1000"),
    ("out", ["--train.expert_parallel_size", "2"],
     "the parallel layout does not fit this run of 1 process: init_parallel_state: ep_size 2 does not divide the "
     "world size 1 (ep_size is train.expert_parallel_size): change those settings or the number of processes"),
    ("out", ["--model.tokenizer_path", "null"], "tasks/train.py: error: model.tokenizer_path is required"),
    ("out", ["--model.config_overrides", "{}"], "error: the model has no config: set model.config_path"),
    pytest.param("out", ["--train.use_wandb", "true"], "train.use_wandb: wandb is not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")),
])
def test_bad_setup_fails_before_anything_starts(tmp_path, output_dir, override, message):
    """An output_dir that cannot be created, a missing train_path, a tokenizer with more tokens than the model's
    vocabulary, no tokenizer or model config (a traceback from deep inside, before), a parallel layout that does not
    fit the processes and a logger that is not installed stop the run with the key named, before the output
    directory (or its config.yaml) is written."""
    (tmp_path / "a_file").write_text("")
    proc = train_one_process(tmp_path / output_dir, *override)
    assert proc.returncode != 0
    assert message.format(tmp=tmp_path) in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / output_dir).exists()


def test_metrics_log_the_lr_each_step_applied(tmp_path):
    """metrics.jsonl's lr at step k is the lr that step k trained with: 2 linear warm-up steps, then cosine decay
    from the peak towards lr_min; every record has a finite loss and tokens/s, and no MFU off the GPU."""
    peak, floor = 2.0e-3, 4.0e-4
    proc = train_one_process(tmp_path / "out", "--train.max_steps", "4", "--train.lr_warmup_ratio", "0.5",
                             "--train.lr", str(peak), "--train.lr_min", str(floor), "--train.lr_decay_style", "cosine",
                             "--train.save_steps", "0", "--data.eval_path", "null", "--train.eval_steps", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    warmup = [peak * (step + 1) / 2 for step in range(2)]
    decay = [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress)) for progress in (0.0, 0.5)]
    assert [r["lr"] for r in records] == pytest.approx(warmup + decay, rel=1e-9)
    assert all(math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 and "mfu" not in r for r in records)


NO_EVAL = ["--data.eval_path", "null", "--train.eval_steps", "0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-process run of 2 steps with checkpoints at steps 1 and 2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    proc = train_one_process(out, "--train.max_steps", "2", "--train.save_steps", "1", *NO_EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_fresh_run_keeps_earlier_checkpoints_out_of_auto(tmp_path, finished_run):
    """A run started anew in another run's output_dir (overwrite_output_dir, as the shipped configs set) keeps that
    run's checkpoints as checkpoints.1; left in place, a later ``load_path auto`` of the new run (killed, say)
    resumed from the other run's newer step 2 instead of its own step 1."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    proc = train_one_process(out, "--train.max_steps", "1", "--train.lr", "1e-3", *NO_EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert find_latest_checkpoint(str(out)) == str(out / "checkpoints" / "global_step_1")
    assert sorted(os.listdir(out / "checkpoints")) == ["global_step_1"]
    assert sorted(os.listdir(out / "checkpoints.1")) == ["global_step_1", "global_step_2"]
    assert "kept the checkpoints already there as" in proc.stderr


def test_empty_load_path_is_no_way_past_the_refusal(tmp_path, finished_run):
    """``load_path: ""`` is no checkpoint, as null: a run in another run's output_dir is refused unless asked to
    overwrite; it started anew there, the refusal skipped (the check looked for null only)."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    proc = train_one_process(out, "--train.overwrite_output_dir", "false", "--train.load_path", "", *NO_EVAL)
    assert proc.returncode == 2 and "already holds checkpoints of another run" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["global_step_1", "global_step_2"]


def test_resume_with_other_batch_settings_says_what_to_do(tmp_path, finished_run):
    """A resume whose data settings differ from the saving run's names the checkpoint, the setting and the remedy."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    proc = train_one_process(out, "--train.max_steps", "3", "--train.micro_batch_size", "1", "--train.load_path",
                             "auto", *NO_EVAL)
    assert proc.returncode != 0
    assert f"train.load_path '{out}/checkpoints/global_step_2': the data position it saved" in proc.stderr
    assert "micro_batch_size=2 vs 1" in proc.stderr and "see that run's config.yaml" in proc.stderr


def test_evaluation_with_batch_size_warmup(tmp_path):
    """Evaluation batches take the full token budget: with a batch-size warm-up the first evaluation crashed
    (its loader was asked for a warm-up without a step count)."""
    proc = train_one_process(tmp_path / "out", "--train.max_steps", "1", "--train.eval_steps", "1",
                             "--train.eval_batches", "1", "--train.bsz_warmup_ratio", "0.5", "--train.train_steps", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["eval_loss"] is not None


def test_resumed_metrics_start_a_new_line(tmp_path):
    """A record cut short when a run died does not swallow the resumed run's first record."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    writer = MetricsWriter(str(tmp_path), enabled=True, resume=True)
    writer.write({"step": 2, "loss": 1.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert lines[1] == '{"step": 2, "lo' and json.loads(lines[2]) == {"step": 2, "loss": 1.5}


def test_resumed_finished_run_writes_the_hf_weights_it_lacks(tmp_path, finished_run):
    """A run killed while exporting its last checkpoint's HF weights and resumed (nothing left to train) writes
    that export; before, the finished run stayed without it."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    proc = train_one_process(out, "--train.max_steps", "2", "--train.save_hf_weights", "true", "--train.load_path",
                             "auto", *NO_EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to train: resumed at step 2" in proc.stderr
    assert (out / "checkpoints" / "global_step_2" / "hf" / "config.json").is_file()
    assert not (out / "checkpoints" / "global_step_1" / "hf").exists()


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resumed_run_traces_its_profiling_window(tmp_path, finished_run):
    """A run resumed after step 1 traces its step 2 for the window [2, 3); the profiler counted the window from its
    own first step, so it only warmed up at step 2 and wrote a trace without it."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "checkpoints" / "global_step_2")
    proc = train_one_process(out, "--train.max_steps", "2", "--train.load_path", "auto", "--train.enable_profiling",
                             "true", "--train.profile_start_step", "2", "--train.profile_end_step", "3", *NO_EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "trace" / "trace_rank0.json") as f:
        names = {event["name"] for event in json.load(f)["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names


def test_last_step_is_logged_and_cut_settings_are_named(tmp_path):
    """A max_steps beyond the epochs, and a profiling window after the last step, are said (the run stopped early
    and traced nothing in silence); the run's last step is in metrics.jsonl whatever log_steps says (it was left
    out unless a multiple of it)."""
    out = tmp_path / "out"
    proc = train_one_process(out, "--train.train_steps", "2", "--train.max_steps", "3", "--train.log_steps", "5",
                             "--train.enable_profiling", "true", "--train.profile_start_step", "3",
                             "--train.profile_end_step", "4", *NO_EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in records(out)] == [2]
    assert "train.max_steps 3 is beyond train.num_train_epochs 1 x 2 steps per epoch: the run stops after 2 steps" \
        in proc.stderr
    assert "profiling: steps [3, 4) are not among this run's steps 1..2: no trace is written" in proc.stderr
    assert not (out / "trace").exists()


def test_non_finite_steps_stop_the_run_and_do_not_move_the_schedule(tmp_path):
    """With an lr of 1e30 and no clipping, steps 2 and 3 have non-finite gradient norms: they are skipped (the lr
    schedule stays where it was) and the second in a row stops the run, naming train.max_bad_steps, with no
    checkpoint of the broken state."""
    out = tmp_path / "out"
    proc = train_one_process(out, "--train.max_steps", "6", "--train.lr", "1e30", "--train.lr_min", "0",
                             "--train.lr_warmup_ratio", "0", "--train.lr_decay_style", "linear",
                             "--train.max_grad_norm", "null", "--train.max_bad_steps", "2", *NO_EVAL)
    assert proc.returncode == 1
    assert ("RuntimeError: 2 non-finite steps in a row (last at step 3, train.max_bad_steps 2); stopping: lower "
            "train.lr") in proc.stderr
    logged = records(out)
    assert [(r["step"], r["skipped"], r["grad_norm"]) for r in logged] == [(1, False, logged[0]["grad_norm"]),
                                                                          (2, True, None), (3, True, None)]
    assert [r["lr"] for r in logged] == pytest.approx([1e30, 1e30 * 5 / 6, 1e30 * 5 / 6])
    assert not (out / "checkpoints").exists()
