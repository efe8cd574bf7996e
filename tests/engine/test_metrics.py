"""metrics.jsonl: strict JSON lines; a resumed run appends to its file, a fresh run in the same output_dir keeps the
earlier file."""

import json
import math

from veofast.utils.metrics import MetricsWriter


def write_steps(output_dir, steps, *, resume):
    writer = MetricsWriter(str(output_dir), enabled=True, resume=resume)
    for step in steps:
        writer.write({"step": step, "loss": 1.0 / step})
    writer.close()


def steps_in(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_fresh_run_keeps_earlier_metrics_and_resume_appends(tmp_path):
    write_steps(tmp_path, [1, 2, 3], resume=False)
    write_steps(tmp_path, [4, 5], resume=True)  # the same run, resumed
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    write_steps(tmp_path, [1, 2], resume=False)  # another run from scratch (overwrite_output_dir)
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2]
    assert steps_in(tmp_path / "metrics.1.jsonl") == [1, 2, 3, 4, 5]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """A skipped step's NaN loss and infinite grad norm give a line that strict JSON readers accept."""
    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "skipped": True})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    record = json.loads(line, parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "skipped": True}
