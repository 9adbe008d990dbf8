"""RunReport: a fresh run in an old folder starts clean; a resumed one keeps completed rounds."""

from __future__ import annotations

import json

from cloud.report import RunReport


def test_fresh_run_forgets_rows_resume_keeps_completed_ones(tmp_path):
    first = RunReport(tmp_path)
    for r in (1, 2, 3):
        first.add({"round": r, "status": "ok", "accuracy": 0.5, "bytes_up": 10})
    first.summary({})
    resumed = RunReport(tmp_path)
    resumed.load_existing(upto_round=2)  # round 3's row was written after the last checkpoint
    assert [r["round"] for r in resumed.rows] == [1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    fresh = RunReport(tmp_path)
    fresh.start_fresh()
    fresh.add({"round": 1, "status": "ok", "accuracy": 0.9, "bytes_up": 5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["accuracy"] for x in lines] == [0.9]
    assert not (tmp_path / "summary.json").exists()
    assert fresh.summary({})["bytes_up"] == 5
