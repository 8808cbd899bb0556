"""An audit append that a full disk cuts short leaves nothing behind: the records the
Auditor keeps and appends again once there is room are in the chain once, not twice."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
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
