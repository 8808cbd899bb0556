"""Where the processes' log lines go and how they name things (appliance/base/logsetup.py,
appliance/base/logsafe.py)."""

from __future__ import annotations

import hashlib
import hmac
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dicomgen
from conftest import run_pacs_edge
from syncagent import sync_once
from test_clock_steps import new_york_box_at

SHOWN_WITH_A_BAR = """
import io, logging
from rich.console import Console
from rich.progress import Progress
from appliance.base.logsetup import setup_logging

setup_logging("info")
terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
with Progress(console=terminal) as progress:
    progress.add_task("migrating", total=10)
    logging.getLogger("appliance.example").info("day done day=20261206")
print(repr(terminal.file.getvalue()))
"""


def test_a_line_logged_under_a_progress_bar_is_printed_above_it() -> None:
    """A command's bar (rich) takes sys.stderr while it is shown; the log handler must
    write to it then, or its lines break into the bar in the operator's terminal."""
    run = subprocess.run([sys.executable, "-c", SHOWN_WITH_A_BAR], capture_output=True,
                         text=True, timeout=60, check=True)
    shown = run.stdout
    assert "day done day=20261206" in shown, (shown, run.stderr)
    assert "day done" not in run.stderr, run.stderr


def test_the_sync_agent_names_a_study_with_the_homes_keyed_reference(
        edge_home: Path, tmp_path: Path) -> None:
    """Only serve (and migrate) loaded the home's log key: the agent's and the other
    commands' references were a per-process random key's, so `study=...` in the agent's
    log matched nothing in serve's, and changed at every restart."""
    study = dicomgen.make_study(tmp_path / "study", seed=51, instances_per_series=1)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    key = (edge_home / "secrets" / "log.key").read_bytes()
    expected = hmac.new(key, study[0].study_uid.encode(), hashlib.sha256).hexdigest()[:12]
    synced = sync_once(edge_home)
    assert f"replicated study={expected} " in synced.stderr, synced.stderr


def test_logref_says_what_a_reference_in_the_log_names(edge_home: Path, tmp_path: Path) -> None:
    """The operator reads `replicated study=...` or `rejected dropped file file=...` and
    must find the study or the file: the references are keyed hashes by design."""
    study = dicomgen.make_study(tmp_path / "study", seed=52, instances_per_series=1)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    [study_ref] = re.findall(r"replicated study=([0-9a-f]{12}) ", sync_once(edge_home).stderr)
    rejected = edge_home / "incoming.rejected" / "CD1" / "IMG1"  # dropped as incoming/CD1/IMG1
    rejected.parent.mkdir(parents=True)
    rejected.write_bytes(b"not DICOM")
    key = (edge_home / "secrets" / "log.key").read_bytes()
    file_ref = hmac.new(key, b"CD1/IMG1", hashlib.sha256).hexdigest()[:12]
    shown = run_pacs_edge("logref", f"study={study_ref}", file_ref, "--home", str(edge_home))
    assert sorted(shown.stdout.splitlines()) == sorted([
        f"{study_ref}  study  {study[0].study_uid}", f"{file_ref}  dropped  {rejected}"])
    gone = run_pacs_edge("logref", "0123456789ab", "--home", str(edge_home), check=False)
    assert gone.returncode == 1
    assert "0123456789ab: names nothing this box holds now" in gone.stderr


def test_log_lines_carry_the_utc_offset_so_the_hour_repeated_in_the_fall_is_told_apart(
        edge_home: Path, tmp_path: Path) -> None:
    """On 1 Nov 2026 New York's clock goes from 01:59:59 EDT back to 01:00:00 EST: a line
    logged at 01:30 EDT and one logged an hour later at 01:30 EST looked alike."""
    runs = []
    for seed, hour in ((53, 5), (54, 6)):  # 01:30 EDT, then 01:30 EST
        dicomgen.make_study(tmp_path / f"study{seed}", seed=seed, instances_per_series=1)
        run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / f"study{seed}"))
        runs.append(sync_once(edge_home, env=new_york_box_at(
            datetime(2026, 11, 1, hour, 30, tzinfo=UTC))))
    first, second = runs
    stamp = re.compile(r"^(\S+) INFO ", re.MULTILINE)
    firsts, seconds = stamp.findall(first.stderr), stamp.findall(second.stderr)
    assert firsts and seconds, (first.stderr, second.stderr)
    assert all(re.fullmatch(r"2026-11-01T01:30:\d\d\.\d{3}-04:00", s) for s in firsts), firsts
    assert all(re.fullmatch(r"2026-11-01T01:30:\d\d\.\d{3}-05:00", s) for s in seconds), seconds
