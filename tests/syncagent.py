"""A real `pacs-edge sync` agent subprocess for tests, and cloud helpers.

SyncAgent runs the agent on a data home (its own process group), waits for
its ready line, and stops it with SIGTERM (SIGKILL after a deadline).
`sync_once` runs one `pacs-edge sync --once` pass. `cloud_blobs` lists what
the configured blob store holds, through the product's own blob-store code.
`security_alerts` counts the audit's alerts of cloud blobs that failed authentication.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import dicomgen
import pytest
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge

READY = re.compile(r"sync agent ready")
TIMEOUT = 60.0


class SyncAgent:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = home.parent / f"{home.name}-sync.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SyncAgent:
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [*pacs_edge_command(), "sync", "--home", str(self.home)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if READY.search(text):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"sync agent exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError("sync agent not ready in time")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def sync_once(home: Path, *, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*pacs_edge_command(), "sync", "--once", "--stable-after", "0", "--home", str(home)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"sync --once exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def tier_state(server: EdgeServer, study_uid: str) -> str:
    import sqlite3

    db = sqlite3.connect(f"file:{server.home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT tier_state FROM studies WHERE study_uid = ?",
                         (study_uid,)).fetchone()
    finally:
        db.close()
    return str(row[0])


def evict(home: Path, study_uid: str) -> None:
    run_pacs_edge("evict", study_uid, "--home", str(home))



def restore_elsewhere(old: Path, cloud: Path, work: Path) -> tuple[Path, str]:
    """The lost-box path of the operator guide: `old`'s keys escrowed, recovered into a
    new home (work/new), and `restore` from `cloud` there; (the new home, its stdout)."""
    passphrase = work / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    escrow, new = work / "escrow", work / "new"
    run_pacs_edge("keys", "escrow", "--home", str(old), "--out", str(escrow),
                  "--passphrase-file", str(passphrase))
    run_pacs_edge("keys", "recover", "--home", str(new), "--from", str(escrow),
                  "--passphrase-file", str(passphrase))
    init_home(new)
    restored = run_pacs_edge("restore", "--home", str(new), "--cloud", f"file://{cloud}")
    return new, restored.stdout


def import_files(home: Path, *instances: dicomgen.GeneratedInstance) -> None:
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in instances))


def stored_hashes(home: Path) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the dataset bytes, for every file in the store."""
    return {str(dicomgen.read_header(p).SOPInstanceUID):
            hashlib.sha256(dicomgen.dataset_bytes(p)).hexdigest()
            for p in (home / "store").rglob("*.dcm")}


def sent_hashes(instances: Iterable[dicomgen.GeneratedInstance]) -> dict[str, str]:
    """The same for generated instances: what the box was sent."""
    return {i.sop_instance_uid: hashlib.sha256(dicomgen.dataset_bytes(i.path)).hexdigest()
            for i in instances}


def assert_fsck_clean(home: Path) -> None:
    fsck = run_pacs_edge("fsck", "--home", str(home), check=False)
    assert fsck.returncode == 0, fsck.stdout


def index_rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows of a read-only query on the home's index, as a test inspects it from outside."""
    import sqlite3

    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


PAUSE_TIMEOUT = 120.0


@contextmanager
def paused(home: Path, point: str, *args: str, returncode: int = 0, says: str = "",
           prefix: Sequence[str] = ()) -> Iterator[subprocess.Popen[str]]:
    """Run `pacs-edge ARGS` (after the command words of `prefix`) until it reaches
    `point`; on exit let it go on and finish with `returncode`, its output holding
    `says`."""
    barrier = home.parent / f"barrier-{point.replace(':', '-')}"
    barrier.mkdir()
    proc = subprocess.Popen(
        [*prefix, *pacs_edge_command(), *args, "--home", str(home)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "PACS_EDGE_PAUSE_AT": point, "PACS_EDGE_PAUSE_DIR": str(barrier)})
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while not (barrier / "reached").exists():
            if proc.poll() is not None:
                pytest.fail(f"{args} ended before {point}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"{args} never reached {point}"
            time.sleep(0.02)
        yield proc
    finally:
        (barrier / "go").touch()
        output, _ = proc.communicate(timeout=PAUSE_TIMEOUT)
    assert proc.returncode == returncode, output
    assert says in output, output


def security_alerts(home: Path) -> int:
    """Audit records of a cloud blob that failed authentication (110113 with PE001)."""
    count = 0
    for line in (home / "audit" / "audit.log").read_text().splitlines():
        event = json.loads(line)["record"]["EventIdentification"]
        codes = {c["csd-code"] for c in event.get("EventTypeCode", ())}
        count += event["EventID"]["csd-code"] == "110113" and "PE001" in codes
    return count
