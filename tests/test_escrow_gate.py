"""Eviction waits for an escrow of the current site key; status and config check say so.

Real processes: `pacs-edge import`, `sync --once`, `evict`, `keys escrow`,
`keys rotate`, `status`, `config check`, on a home whose cloud is the default
local folder. The homes here do not set the tests' usual override
([sync] evict_without_escrow), except where the override itself is tested.

serve's unit hides `site.key` from it; it learns the key's id from
`<home>/site-key-id.json` instead, shown by a real serve in the unit's
file-system view (tests/unitsandbox.py, needs root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
import unitsandbox
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from prometheus_client.parser import text_string_to_metric_families
from syncagent import sync_once

from provisioning.escrow_state import escrow_status

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


def _local_files(home: Path, sop_uids: list[str]) -> list[bool]:
    """Per instance: the index says local and its file is in the store."""
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        rows = [db.execute("SELECT is_local, path FROM instances WHERE sop_uid = ?",
                           (uid,)).fetchone() for uid in sop_uids]
    finally:
        db.close()
    return [bool(local) and (home / "store" / path).exists() for local, path in rows]


def test_late_instances_of_an_evicted_study_stay_local_until_the_key_is_escrowed(
        tmp_path: Path) -> None:
    """A late instance of an evicted study left local disk once uploaded, escrow or not:
    its only copy was then a pack that no escrow opened (after `keys rotate`, or with a
    key never escrowed), lost with the box."""
    home = init_home(tmp_path / "home", default_peer=False, evict_without_escrow=False)
    study = dicomgen.make_study(tmp_path / "sent", seed=61)
    first, late, later = study[:4], study[4], study[5]
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in first))
    sync_once(home)
    assert evict(home, first[0].study_uid, "--without-escrow")[0] == 0
    run_pacs_edge("import", "--home", str(home), str(late.path))
    assert "replicated 1 study version" in sync_once(home).stdout
    assert _local_files(home, [late.sop_instance_uid]) == [True]
    assert tier_states(home) == {first[0].study_uid: "evicted"}

    escrow(home, tmp_path / "site.escrow")  # from now on they leave, as an eviction would
    run_pacs_edge("import", "--home", str(home), str(later.path))
    assert "replicated 1 study version" in sync_once(home).stdout
    assert _local_files(home, [late.sop_instance_uid, later.sop_instance_uid]) == [True, False]
    recalled = run_pacs_edge("recall", first[0].study_uid, "--home", str(home)).stdout
    assert "recalled 5 instance(s)" in recalled, recalled


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


# --- serve, which may not read the site key ---------------------------------------------

SERVE_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pacs-edge.service"
NO_ESCROW = ("pacs_edge_health_warning", (("code", "no_escrow"),))
ESCROW_OK = ("pacs_edge_escrow_ok", ())


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="the unit's file-system view needs root and unshare(1)")
def test_serve_in_its_unit_reports_the_escrow_of_the_site_key_it_cannot_read(
        tmp_path: Path, free_port: Callable[[], int]) -> None:
    home = init_home(tmp_path / "home", default_peer=False, evict_without_escrow=False)
    port = free_port()
    EdgeServer(home).configure(metrics={"host": "127.0.0.1", "port": port})
    escrow(home, tmp_path / "site.escrow")
    site_key, report, log_path = home / "secrets/site.key", tmp_path / "report", tmp_path / "log"
    with open(log_path, "wb") as log:
        proc = unitsandbox.start(
            SERVE_UNIT, [*pacs_edge_command(), "serve", "--home", str(home)],
            user="root", group="root", probes=[site_key], report=report,
            stage=tmp_path / "stage",
            path_map={"/var/lib/pacs-edge": str(home), "/etc/pacs-edge": str(tmp_path / "etc")},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                escrowed = scrape(url)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert unitsandbox.read_report(report) == {str(site_key): "missing"}
        assert escrowed[ESCROW_OK] == 1.0 and NO_ESCROW not in escrowed, escrowed

        run_pacs_edge("keys", "rotate", "--home", str(home))  # no sync agent runs here
        rotated = scrape(url)
        assert rotated[ESCROW_OK] == 0.0 and rotated[NO_ESCROW] == 1.0, rotated
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()


ACCEPTED = ("pacs_edge_health_warning", (("code", "no_escrow_accepted"),))


def test_a_missing_escrow_the_lab_accepted_is_not_the_warning_the_alert_watches(
        tmp_path: Path, free_port: Callable[[], int]) -> None:
    """Without the override a missing escrow is `no_escrow` (eviction waits: the alert
    PacsEdgeNoEscrow); with [sync] evict_without_escrow = true it is `no_escrow_accepted`
    (an info alert), in serve's /metrics and in `status` alike: the escrow is still
    missing (pacs_edge_escrow_ok 0), but nothing waits for the operator."""
    home = init_home(tmp_path / "home", default_peer=False, evict_without_escrow=False)
    port = free_port()
    server = EdgeServer(home)
    server.configure(metrics={"host": "127.0.0.1", "port": port})
    seen: dict[bool, tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], set[str]]] = {}
    for accepted in (False, True):
        server.configure(sync={"evict_without_escrow": accepted})
        server.start()
        try:
            metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            server.stop()
        status = run_pacs_edge("status", "--json", "--home", str(home))
        seen[accepted] = metrics, {w["code"] for w in json.loads(status.stdout)["warnings"]}
    refused, accepted_risk = seen[False], seen[True]
    assert refused[0][NO_ESCROW] == 1.0 and ACCEPTED not in refused[0]
    assert "no_escrow" in refused[1] and "no_escrow_accepted" not in refused[1]
    assert accepted_risk[0][ACCEPTED] == 1.0 and NO_ESCROW not in accepted_risk[0]
    assert accepted_risk[0][ESCROW_OK] == 0.0
    assert "no_escrow_accepted" in accepted_risk[1] and "no_escrow" not in accepted_risk[1]


def test_a_home_older_than_the_key_id_record_gets_it_from_init_or_status(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home", default_peer=False)
    record = home / "site-key-id.json"
    kid = json.loads(record.read_text())["site_key_id"]
    assert record.stat().st_mode & 0o777 == 0o640
    for command in ("init", "status"):  # the role runs init on every converge
        record.unlink()
        run_pacs_edge(command, "--home", str(home))
        assert json.loads(record.read_text()) == {"site_key_id": kid}, command


def test_only_a_reader_that_asks_for_it_takes_the_public_id_for_the_key(
        tmp_path: Path) -> None:
    """serve's report may use the record; the eviction gate (the default) never does."""
    home = init_home(tmp_path / "home", default_peer=False, evict_without_escrow=False)
    escrow(home, tmp_path / "site.escrow")
    (home / "secrets/site.key").rename(tmp_path / "site.key")  # as serve's unit hides it
    strict, public = escrow_status(home), escrow_status(home, published_id=True)
    assert not strict.ok and "site.key: secret file is missing" in (strict.problem or "")
    assert public.ok and public.problem is None
    (home / "site-key-id.json").unlink()
    assert "nor does" in (escrow_status(home, published_id=True).problem or "")
