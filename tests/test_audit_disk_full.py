"""An audit append that a full disk cuts short leaves nothing behind: the records the
Auditor keeps and appends again once there is room are in the chain once, not twice."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import dcmtk
import pytest
from conftest import EdgeServer
from dicomgen import make_studies
from prometheus_client.parser import text_string_to_metric_families
from smalldisk import NEEDS_ROOT, tmpfs

from appliance.audit.log import AuditLog, AuditLogError

pytestmark = NEEDS_ROOT


def test_audit_append_cut_short_by_a_full_disk_is_taken_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "disk", 1) as disk:
        log = AuditLog(disk / "audit" / "audit.log")
        log.append([{"n": 0}])
        # The log's first page holds a few more lines; the batch needs several pages.
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        subprocess.run(["fallocate", "-l", str(free), str(disk / "filler.bin")], check=True)
        batch = [{"n": n, "pad": "x" * 300} for n in range(1, 30)]
        with pytest.raises(AuditLogError):
            log.append(batch)
        assert log.path.read_bytes().count(b"\n") == 1

        (disk / "filler.bin").unlink()
        log.append(batch)  # as the Auditor does with what it kept
        numbers = [json.loads(line)["record"]["n"]
                   for line in log.path.read_bytes().splitlines()]
        assert numbers == list(range(30))
        assert "partial record" not in caplog.text


def failed_audit_writes(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return next(s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "pacs_edge_audit_write_failures_total")


def test_an_audit_log_that_refuses_records_shows_in_metrics(edge_server: EdgeServer,
                                                             tmp_path: Path) -> None:
    """serve keeps records the log refuses in memory and says so in its log only; the
    fleet's Prometheus sees it as a count (PacsEdgeAuditLogFailing), and the records
    reach the log once it takes them again."""
    port = dcmtk.free_port()
    edge_server.stop()
    edge_server.configure(metrics={"port": port})
    edge_server.start()
    assert failed_audit_writes(port) == 0
    audit = edge_server.home / "audit"
    lines = AuditLog.for_home(edge_server.home).head().seq
    subprocess.run(["mount", "--bind", str(audit), str(audit)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(audit)], check=True)
        files = [i.path for i in make_studies(tmp_path / "study", instances_per_series=1)]
        dcmtk.storescu(edge_server.port, files).check()
        deadline = time.monotonic() + 30
        while failed_audit_writes(port) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert failed_audit_writes(port) > 0
    finally:
        subprocess.run(["umount", str(audit)], check=True)
    deadline = time.monotonic() + 30
    while AuditLog.for_home(edge_server.home).head().seq == lines and time.monotonic() < deadline:
        time.sleep(0.2)
    assert AuditLog.for_home(edge_server.home).head().seq > lines
