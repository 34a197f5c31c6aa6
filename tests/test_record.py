"""adrec.record: the trial row's rules and the table file (atomic, durable, a clear error when broken)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow as pa
import pytest

from adrec.config import METRICS, TrialConfig
from adrec.record import (PHASES, RecordError, columns, outcome, read_table, to_frame, trial_row, write_atomic,
                          write_json, write_table)

ENV = {"code_version": "abc", "torch_version": "t", "ray_version": "r", "optuna_version": "o"}


def _row(status: str, error: str | None, ray_status: str = "TERMINATED", **config) -> dict:
    fit = {"status": status, "val": {m: 0.1 for m in METRICS}, "test": {m: 0.2 for m in METRICS},
           "epochs": {"stage1": 3}, "seconds": {}, "env": {}}
    cfg = {**TrialConfig().to_dict(), "phase": "paired", "config_id": "p000", **config}
    return trial_row(sweep="s", trial_id=f"t-{status}", config=cfg, ray_status=ray_status, history=None,
                     fit_result=fit, error=error, env=ENV)


@pytest.mark.parametrize("status, ray_status, kept", [
    ("completed", "TERMINATED", False), ("pruned", "TERMINATED", False),
    ("diverged", "TERMINATED", True), ("failed", "ERROR", True),
])
def test_error_only_for_failed_or_diverged_rows(status: str, ray_status: str, kept: bool) -> None:
    row = _row(status, "RuntimeError: boom (a crash the trial recovered from)", ray_status)
    assert row["status"] == status
    assert (row["error"] is not None) == kept


def test_a_failed_row_without_a_message_still_says_it_failed() -> None:
    assert _row("diverged", None)["error"] == "diverged (no message)"


def test_inactive_knobs_are_null_in_a_row() -> None:
    row = _row("completed", None, aggregation="adaln", stage_plan="no_pretrain")
    assert row["lambda_uncertainty"] is None and row["stage1_epochs"] is None and row["stage2_epochs"] is None
    assert row["aggregation"] == "adaln" and row["stage3_epochs"] == 495
    assert list(to_frame([row]).columns) == columns()


def test_unfinished_trials_have_no_row_and_outcomes_follow_the_last_result() -> None:
    assert trial_row(sweep="s", trial_id="x", config={}, ray_status="RUNNING", history=None, fit_result=None,
                     error=None, env=ENV) is None
    assert outcome({"final": 1}, False) == "completed"
    assert outcome({"final": 1, "diverged": 1}, False) == "diverged"
    assert outcome({"final": 0}, False) == "pruned" and outcome(None, True) == "failed"


def test_table_round_trip_sorted_by_phase(tmp_path) -> None:
    rows = [_row("completed", None, phase=p) | {"trial_id": p} for p in reversed(PHASES)]
    path = tmp_path / "trials.parquet"
    write_table(to_frame(rows), path)
    back = read_table(path)
    assert list(back["phase"]) == list(PHASES)
    assert math.isnan(back["lambda_uncertainty"].iloc[0]) is False
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_table_is_empty_and_a_truncated_one_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "trials.parquet"
    assert read_table(path).empty
    write_table(to_frame([_row("completed", None)]), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RecordError, match=r"trials.parquet is not a readable Parquet trial table .*--resume") as err:
        read_table(path)
    assert "\n" not in str(err.value)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})

    def half_then_fail(tmp) -> None:  # what a full disk does halfway through a write
        tmp.write_text('{"a": 2, "b"')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half_then_fail)
    with pytest.raises(pa.ArrowInvalid):
        write_table(pd.DataFrame({"bad": [object()]}), tmp_path / "t.parquet")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
