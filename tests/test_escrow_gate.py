"""Eviction waits for an escrow of the current site key; status and config check say so.

Real processes: `pacs-edge import`, `sync --once`, `evict`, `keys escrow`,
`keys rotate`, `status`, `config check`, on a home whose cloud is the default
local folder. The homes here do not set the tests' usual override
([sync] evict_without_escrow), except where the override itself is tested.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import dicomgen
import pytest
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import sync_once

PASSPHRASE = "correct horse battery staple"


def tier_states(home: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT study_uid, tier_state FROM studies").fetchall())
    finally:
        db.close()


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[Path, list[str]]:
    """A home without the override, with two studies replicated to its cloud."""
    home = init_home(tmp_path / "home", default_peer=False, evict_without_escrow=False)
    sent = dicomgen.make_studies(tmp_path / "sent", seed=51, patients=2, series_per_study=1,
                                 instances_per_series=1)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "sent"))
    sync_once(home)
    uids = sorted({i.study_uid for i in sent})
    assert set(tier_states(home).values()) == {"replicated"}
    return home, uids


def escrow(home: Path, out: Path) -> None:
    passphrase = out.parent / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)  # others may not read it
    run_pacs_edge("keys", "escrow", "--home", str(home), "--out", str(out),
                  "--passphrase-file", str(passphrase))


def evict(home: Path, uid: str, *args: str) -> tuple[int, str]:
    result = run_pacs_edge("evict", uid, "--home", str(home), *args, check=False)
    return result.returncode, result.stdout + result.stderr


def test_evict_refused_until_the_site_key_is_escrowed(
        replicated: tuple[Path, list[str]], tmp_path: Path) -> None:
    home, uids = replicated
    code, output = evict(home, uids[0])
    assert code == 2, output
    assert "eviction refused: the site key was never escrowed" in output
    assert "pacs-edge keys escrow" in output and "Traceback" not in output
    assert set(tier_states(home).values()) == {"replicated"}

    status = run_pacs_edge("status", "--home", str(home))
    assert "warning: the site key was never escrowed" in status.stderr
    assert "MISSING" in status.stdout
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["escrow"]["ok"] is False and report["escrow"]["escrowed_key_id"] is None
    check = run_pacs_edge("config", "check", "--home", str(home))  # a warning, not an error
    assert "warn   site key escrow: the site key was never escrowed" in check.stderr
    assert "keys escrow" in check.stderr

    escrow(home, tmp_path / "site.escrow")
    record = json.loads((home / "escrow.json").read_text())
    assert (home / "escrow.json").stat().st_mode & 0o777 == 0o640
    assert evict(home, uids[0])[0] == 0
    assert tier_states(home)[uids[0]] == "evicted"
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert report["escrow"]["ok"] is True
    assert report["escrow"]["escrowed_key_id"] == record["site_key_id"]
    check = run_pacs_edge("config", "check", "--home", str(home))
    assert f"ok     site key escrow: {record['site_key_id']}" in check.stdout
    assert "warn" not in check.stderr


def test_agent_pass_skips_eviction_without_escrow_once_per_pass(
        replicated: tuple[Path, list[str]], tmp_path: Path) -> None:
    home, uids = replicated
    EdgeServer(home).configure(sync={"evict_after_days": 0.0, "disk_high_watermark_percent": 1.0,
                                     "disk_low_watermark_percent": 1.0})
    skipped = sync_once(home)
    assert "evicted 0" in skipped.stdout
    assert skipped.stderr.count("eviction skipped this pass") == 1, skipped.stderr
    assert "keys escrow" in skipped.stderr
    assert set(tier_states(home).values()) == {"replicated"}

    escrow(home, tmp_path / "site.escrow")
    done = sync_once(home)
    assert f"evicted {len(uids)}" in done.stdout and "eviction skipped" not in done.stderr
    assert set(tier_states(home).values()) == {"evicted"}


def test_key_rotation_makes_the_escrow_stale_for_eviction(
        replicated: tuple[Path, list[str]], tmp_path: Path) -> None:
    home, uids = replicated
    escrow(home, tmp_path / "before.escrow")
    run_pacs_edge("keys", "rotate", "--home", str(home))
    code, output = evict(home, uids[0])
    assert code == 2, output
    assert "rotated since" in output and "keys escrow" in output
    assert json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout
                      )["escrow"]["ok"] is False

    escrow(home, tmp_path / "after.escrow")
    assert evict(home, uids[0])[0] == 0


def test_evict_without_escrow_is_an_explicit_override(
        replicated: tuple[Path, list[str]]) -> None:
    home, uids = replicated
    code, output = evict(home, uids[0], "--without-escrow")
    assert code == 0, output
    EdgeServer(home).configure(sync={"evict_without_escrow": True})
    assert evict(home, uids[1])[0] == 0
    assert set(tier_states(home).values()) == {"evicted"}
    status = run_pacs_edge("status", "--home", str(home))  # still warned about
    assert "evicting anyway" in status.stderr
