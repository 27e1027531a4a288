"""Run records: every round line is on disk as soon as it is measured, and a failed run still gets
its summary."""

import json

from fedlora.config import compose, resolve
from fedlora.records import RunRecorder, human_bytes


def row(r, acc, up):
    return {"round": r, "test_accuracy": acc, "test_loss": 1.0, "train_loss": 0.5, "num_clients": 2,
            "rejected": 0, "bytes_up": up, "bytes_down": up, "cum_bytes_up": up * r, "cum_bytes_down": up * r,
            "round_seconds": 1.0}


def test_lines_are_flushed_and_a_failure_is_summarised(tmp_path):
    cfg = resolve(compose(["num_rounds=5"]))
    rec = RunRecorder(tmp_path, cfg)
    rec.initial = {"test_accuracy": 0.1, "test_loss": 2.3}
    rec.record_round(row(1, 0.5, 100))
    rec.record_round(row(2, float("nan"), 100))
    rec.record_round(row(3, 0.4, 100))
    # readable before the recorder closes
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    summary = rec.close("failed", "RuntimeError: boom")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert (summary["rounds_completed"], summary["rounds_planned"]) == (3, 5)
    assert (summary["best_accuracy"], summary["best_round"], summary["final_accuracy"]) == (0.5, 1, 0.4)
    assert summary["total_bytes_up"] == 300 and summary["initial_accuracy"] == 0.1
    assert "num_rounds: 5" in (tmp_path / "config.yaml").read_text()


def test_a_run_with_no_round_has_an_empty_summary(tmp_path):
    summary = RunRecorder(tmp_path, resolve(compose([]))).close("failed", "x")
    assert summary["rounds_completed"] == 0 and summary["best_accuracy"] is None
    assert summary["total_bytes_up"] == 0


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1500, 7_850_000, 3.2e9, 4.1e12)] == [
        "512 B", "1.50 kB", "7.85 MB", "3.20 GB", "4100.00 GB"]
