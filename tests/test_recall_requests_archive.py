"""Recall requests while a pack is being rehydrated out of the Archive tier.

Azure takes up to 15 hours to bring a pack back from Archive. The agent's
recall-requests job must not wait for it: the archived study's request stays
pending (the study `evicted`, its rehydration asked for) while the requests
behind it, whose packs are online, are recalled; once the rehydration is done,
the archived study is recalled too. Before, the job recalled one study at a
time and waited inside the archived one's recall, so every other C-MOVE, C-GET
and viewer waiting for a recall timed out behind it.

The agent is the real `pacs-edge sync` process; its cloud is the local-folder
blob store, whose rehydration the test starts with an hour's delay (the state is
in the folder, so the agent sees the pack offline) and finishes by hand.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import dicomgen
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import SyncAgent, evict, sent_hashes, stored_hashes, sync_once, tier_state

DEADLINE = 60.0


def request_recalls(home: Path, *study_uids: str) -> None:
    """What a C-MOVE of each study files for the agent, oldest first."""
    from appliance.store.index import Index
    from appliance.store.recall_requests import request_recall

    async def run() -> None:
        async with Index(home / "index.sqlite3") as index:
            for study_uid in study_uids:
                await request_recall(index, [study_uid], "test")

    asyncio.run(run())


def wait_for_state(server: EdgeServer, study_uid: str, state: str, agent: SyncAgent) -> None:
    deadline = time.monotonic() + DEADLINE
    while tier_state(server, study_uid) != state:
        assert time.monotonic() < deadline, (study_uid, tier_state(server, study_uid),
                                             agent.log()[-3000:])
        time.sleep(0.1)


def test_a_recall_waiting_for_an_archive_rehydration_holds_up_no_other_recall(
        tmp_path: Path) -> None:
    from sync.blobstore.base import Tier
    from sync.blobstore.local import LocalFolderStore

    home = init_home(tmp_path / "home")
    server = EdgeServer(home)
    server.configure(sync={"rehydrate_poll_seconds": 0.2, "recall_poll_seconds": 0.2})
    made = dicomgen.make_studies(tmp_path / "studies", seed=83, studies_per_patient=2,
                                 series_per_study=1, instances_per_series=2, size=64)
    archived, online = sorted({i.study_uid for i in made})
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "studies"))
    sync_once(home)
    evict(home, archived)
    evict(home, online)
    cloud = home / "cloud"
    [pack] = [i.name for i in LocalFolderStore(cloud).list() if i.name.endswith(".pack")
              and i.name.startswith(_study_prefix(home, archived))]
    LocalFolderStore(cloud).set_tier(pack, Tier.ARCHIVE)
    # Rehydration asked, due in an hour: offline for the agent until the test ends it.
    LocalFolderStore(cloud, rehydrate_delay=3600.0).set_tier(pack, Tier.HOT)
    assert not LocalFolderStore(cloud).stat(pack).online

    request_recalls(home, archived, online)  # the archived study's request is the older
    agent = SyncAgent(home).start()
    try:
        wait_for_state(server, online, "replicated", agent)
        assert tier_state(server, archived) == "evicted"  # waits, holding no lease
        LocalFolderStore(cloud).set_tier(pack, Tier.HOT)  # the cloud finished
        wait_for_state(server, archived, "replicated", agent)
    finally:
        agent.stop()
    assert "recall waits for the rehydration of archived packs" in agent.log()
    assert sent_hashes(made).items() <= stored_hashes(home).items()


def _study_prefix(home: Path, study_uid: str) -> str:
    from provisioning.site_secrets import load_name_secret
    from sync.pack import naming

    return naming.study_prefix(naming.study_key(load_name_secret(home), study_uid))
