"""The drill history and the last report of each host: written atomically; a corrupt history is kept aside and
said so, never read as empty and overwritten."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from primespark.backup.drill import DrillReport, HistoryUnreadable, append_history, history_path, load_history

SPARK = [sys.executable, "-m", "primespark.cli.app"]


def report(host: str = "pi-1", failures: list[str] | None = None) -> DrillReport:
    return DrillReport(host, "pi-3", "2026-01-01T05:00:00+00:00", "nas-primary", snapshot="a" * 64,
                       failures=failures or [])


def test_a_corrupt_history_is_kept_aside_and_said_so(tmp_path: Path) -> None:
    append_history(tmp_path, report("pi-1"))
    path = history_path(tmp_path)
    path.write_text('[{"host": "pi-1", "result": "pass"}, {"host": ')  # torn by a full disk, say
    with pytest.raises(HistoryUnreadable, match="cannot be read"):
        load_history(tmp_path)
    latest = report("pi-2", ["RPO breach"])
    rows = append_history(tmp_path, latest)
    assert [r["host"] for r in rows] == ["pi-2"]
    [aside] = list(path.parent.glob("history.json.corrupt-*"))
    assert aside.read_text().startswith('[{"host": "pi-1"'), "the corrupt history was not kept as it was"
    assert any(aside.name in note and "kept aside" in note for note in latest.notes), latest.notes


def test_the_last_report_is_written_whole_and_private(tmp_path: Path) -> None:
    append_history(tmp_path, report("pi-1"))
    last = history_path(tmp_path).parent / "last-pi-1.json"
    assert json.loads(last.read_text())["host"] == "pi-1"
    assert stat.S_IMODE(last.stat().st_mode) == 0o600
    assert sorted(p.name for p in last.parent.iterdir()) == ["history.json", "last-pi-1.json"], "a temporary file"


def test_drill_report_names_a_corrupt_history_instead_of_showing_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    history_path(state).parent.mkdir()
    history_path(state).write_text("not json")
    done = subprocess.run([*SPARK, "drill", "report", "--env", "lab"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPARK_STATE_DIR": str(state)})
    assert done.returncode == 1 and "cannot be read" in done.stderr and "keeps it aside" in done.stderr, done.stderr
    assert "no drill has run" not in done.stdout and "Traceback" not in done.stderr
