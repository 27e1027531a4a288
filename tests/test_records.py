"""Run records: every round line is on disk as soon as it is measured, and a failed run still gets
its summary."""

import json

import pytest

from fedlora.config import compose, resolve
from fedlora.ledger import Ledger
from fedlora.records import RunRecorder, human_bytes


def row(r, acc, up):
    return {"round": r, "test_accuracy": acc, "test_loss": 1.0, "train_loss": 0.5, "num_clients": 2,
            "rejected": 0, "bytes_up": up, "bytes_down": up, "cum_bytes_up": up * r, "cum_bytes_down": up * r,
            "round_seconds": 1.0}


def test_lines_are_flushed_and_a_failure_is_summarised(tmp_path):
    cfg = resolve(compose(["num_rounds=5"]))
    # the fourth round sent its messages (50 bytes) but never finished
    rec = RunRecorder(tmp_path, cfg, Ledger(total_up=300, total_down=350))
    rec.initial = {"test_accuracy": 0.1, "test_loss": 2.3}
    rec.record_round(row(1, 0.5, 100))
    rec.record_round(row(2, float("nan"), 100))
    rec.record_round(row(3, 0.4, 100))
    # readable before the recorder closes, and strict JSON (no NaN)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for x in lines]
    assert [r["round"] for r in parsed] == [1, 2, 3] and parsed[1]["test_accuracy"] is None
    summary = rec.close("failed", "RuntimeError: boom")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert (summary["rounds_completed"], summary["rounds_planned"]) == (3, 5)
    assert (summary["best_accuracy"], summary["best_round"], summary["final_accuracy"]) == (0.5, 1, 0.4)
    assert (summary["total_bytes_up"], summary["total_bytes_down"]) == (300, 350)
    assert summary["initial_accuracy"] == 0.1
    assert "num_rounds: 5" in (tmp_path / "config.yaml").read_text()


def test_a_run_with_no_round_has_an_empty_summary(tmp_path):
    summary = RunRecorder(tmp_path, resolve(compose([])), Ledger()).close("failed", "x")
    assert summary["rounds_completed"] == 0 and summary["best_accuracy"] is None
    assert summary["total_bytes_up"] == 0


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1500, 7_850_000, 3.2e9, 4.1e12)] == [
        "512 B", "1.50 kB", "7.85 MB", "3.20 GB", "4100.00 GB"]
