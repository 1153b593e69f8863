"""The phases of a training run's fixed time (pipelines/train/phases.py) and where a run reports them.

    pytest tests/pipelines/train/test_train_phases.py

A phase runs from the previous mark present to its own, so phases add up to the wall time; a run's
summary.json holds the driver's and rank 0's marks, the phases, and the time evaluations and checkpoints
took. No timing assertions (speed lives in bench/train.py overhead).
"""

from __future__ import annotations

import json

import pytest
from train_testlib import base_config

from pipelines.train.phases import MARKS, PHASES, phase_seconds, process_start


def test_phases_run_from_the_previous_mark_present_and_add_up():
    marks = {"process_start": 100.0, "run_start": 101.0, "validated": 101.5, "ray_ready": 104.0,
             "worker_start": 110.0, "engine_ready": 113.0, "first_step_done": 113.25, "summary_done": 130.0}
    ph = phase_seconds(marks)
    assert ph["import"] == 1.0 and ph["validate"] == 0.5 and ph["ray_init"] == 2.5
    assert ph["worker_group"] == 6.0  # from ray_ready: fit_start is missing
    assert ph["deepspeed_init"] == 3.0 and ph["first_step"] == 0.25
    assert "worker_import" not in ph and "steps" not in ph
    assert ph["to_first_step"] == 13.25 and ph["wall"] == 30.0
    assert sum(v for k, v in ph.items() if k in PHASES) == pytest.approx(ph["wall"])


def test_every_phase_has_a_mark_and_the_process_start_is_in_the_past():
    import time

    assert [m for m, _ in MARKS][0] == "process_start" and len(PHASES) == len(MARKS) - 1
    assert process_start() <= time.time()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_a_run_reports_its_phases(ray_session, char_data, tmp_path, launcher):
    from pipelines.train.trainer import run

    rd = tmp_path / "run"
    res = run(base_config(char_data, rd, max_steps=4, eval_interval=2, ckpt_interval=2, launcher=launcher))
    s = json.loads((rd / "summary.json").read_text())
    assert s["phase_seconds"] == res.extra["phase_seconds"] and s["launcher"] == launcher
    for mark in ("process_start", "run_start", "fit_start", "worker_start", "imports_done",
                 "engine_ready", "first_step_done", "last_step_done", "worker_done", "fit_end", "summary_done"):
        assert mark in s["phase_marks"], mark
    # launcher=local starts no Ray: no ray_init phase
    assert ("ray_ready" in s["phase_marks"]) == (launcher == "ray")
    ph = s["phase_seconds"]
    assert all(v >= 0 for k, v in ph.items()), ph
    assert ph["to_first_step"] <= ph["wall"]
    # 2 evaluations and 2 checkpoints (steps 2 and 4), their time and share of the wall
    assert s["eval_seconds"] > 0 and s["checkpoint_seconds"] > 0
    assert 0 < s["eval_share"] < 1 and 0 < s["checkpoint_share"] < 1
