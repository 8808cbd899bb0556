"""`[sync] rehydrate_priority`: how a recall asks Azure to bring a pack out of Archive.

A recall of a study whose pack is on the Archive tier (C-MOVE, C-GET, the viewer,
`pacs-edge recall`) waits for Azure to rehydrate the pack: up to 15 hours at
Standard priority, under an hour for most packs at High. A site that archives
and wants its radiologists to wait less sets "high"; what Azure was asked is read
from a real Azurite's request log (Azurite itself rehydrates at once), and the
web's recall answer expects hours to match.
"""

from __future__ import annotations

from pathlib import Path

import dicomgen
import pytest
from azurite import AzuriteServer
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import evict, index_rows, sync_once

from appliance.base.config import load_config
from appliance.http.recall_answer import RECALL_HEADER, recall_unavailable
from appliance.services.web_retrieve import Located


@pytest.mark.parametrize(("priority", "asked"), [("standard", "Standard"), ("high", "High")])
def test_a_recall_from_archive_asks_azure_for_the_configured_priority(
        tmp_path: Path, priority: str, asked: str) -> None:
    from sync.blobstore.azure import AzureBlobStore
    from sync.blobstore.base import Tier

    debug_log = tmp_path / "azurite-requests.log"
    with AzuriteServer(tmp_path / "azurite", debug_log=debug_log) as azurite:
        home = init_home(tmp_path / "home")
        credentials = home / "secrets" / "azure.conn"
        credentials.write_text(azurite.connection_string)
        credentials.chmod(0o600)
        EdgeServer(home).configure(
            cloud={"url": "azure://rehydrate", "credentials_file": str(credentials)},
            sync={"stable_after_seconds": 0.0, "rehydrate_poll_seconds": 0.2,
                  "rehydrate_priority": priority})
        study = dicomgen.make_studies(tmp_path / "study", seed=33, series_per_study=1,
                                      instances_per_series=2, size=16)
        run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
        sync_once(home)
        study_uid = study[0].study_uid
        evict(home, study_uid)
        [(pack,)] = index_rows(home, "SELECT pack_name FROM packs")
        store = AzureBlobStore("rehydrate", azurite.connection_string)
        try:
            store.set_tier(pack, Tier.ARCHIVE)
            recalled = run_pacs_edge("recall", study_uid, "--home", str(home))
            assert "recalled 2 instance(s)" in recalled.stdout, recalled.stdout
            assert store.stat(pack).tier is Tier.HOT
        finally:
            store.close()
    requests = debug_log.read_text(errors="replace")
    assert f'"rehydratePriority":"{asked}"' in requests
    other = {"Standard": "High", "High": "Standard"}[asked]
    assert f'"rehydratePriority":"{other}"' not in requests


@pytest.mark.parametrize(("priority", "expect"), [("standard", 16 * 3600), ("high", 3 * 3600)])
def test_the_web_expects_an_archive_recall_to_take_as_long_as_its_priority_does(
        tmp_path: Path, priority: str, expect: int) -> None:
    """The viewer gives up after `expect`: 16 h at High priority would keep a page
    asking for hours after the study could have come back; 3 h at Standard would give
    up on most rehydrations that were still on their way."""
    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(sync={"rehydrate_priority": priority})
    answer = recall_unavailable(Located((), (), recall_pending=True, recall_from_archive=True),
                                load_config(home))
    assert answer.status == 503
    assert answer.headers[RECALL_HEADER] == f"rehydrating; expect={expect}"


def test_a_rehydrate_priority_azure_does_not_know_is_refused_by_config_check(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(sync={"rehydrate_priority": "urgent"})
    checked = run_pacs_edge("config", "check", "--home", str(home), check=False)
    assert checked.returncode != 0
    assert "sync.rehydrate_priority" in checked.stdout + checked.stderr
    assert "standard or high" in checked.stdout + checked.stderr
