"""MetricsLogger on its own (no Ray): JSONL records, TensorBoard scalars per step, resume truncation."""

from __future__ import annotations

import json

import pytest

from pipelines.train.metrics import METRICS, MetricsLogger, read_metrics


def _tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_train_and_eval_scalars_reach_tensorboard_and_jsonl(tmp_path):
    log = MetricsLogger(tmp_path, max_steps=3, start_step=0, resumed=False, tensorboard=True, progress=False)
    for s in (1, 2, 3):
        log.train(s, {"loss": 3.0 - s / 10, "lr": 1e-3 * s, "grad_norm": float("nan"), "tokens_seen": 64 * s})
    log.eval(3, {"val_loss": 2.5, "val_ppl": 12.18})
    log.close()

    recs = read_metrics(tmp_path, "train")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["loss"] == pytest.approx(2.8) and recs[2]["tokens_seen"] == 192
    sc = _tb_scalars(tmp_path / "tb")
    assert [st for st, _ in sc["train/loss"]] == [1, 2, 3]
    assert [v for _, v in sc["train/loss"]] == pytest.approx([2.9, 2.8, 2.7])
    assert [v for _, v in sc["train/lr"]] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert [v for _, v in sc["train/tokens_seen"]] == [64, 128, 192]
    assert "train/grad_norm" not in sc  # NaN is left out of TensorBoard (kept in the JSONL as NaN)
    assert sc["val/val_loss"] == [(3, pytest.approx(2.5))]


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    log = MetricsLogger(tmp_path, max_steps=5, start_step=0, resumed=False, tensorboard=True, progress=False)
    for s in range(1, 6):
        log.train(s, {"loss": float(s)})
    log.close()
    log = MetricsLogger(tmp_path, max_steps=5, start_step=3, resumed=True, tensorboard=True, progress=False)
    for s in (4, 5):
        log.train(s, {"loss": 10.0 + s})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    # TensorBoard: purge_step drops the first attempt's steps 4 and 5
    assert [(st, v) for st, v in _tb_scalars(tmp_path / "tb")["train/loss"]] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
