"""The cloud lifecycle after a recall from the Archive tier.

The lifecycle moves a pack to colder tiers by its age. A recall of an archived
pack rehydrates it (back to Hot); the index must then say Hot, and the pack
ages again from that moment: it goes back to Archive after `archive_after_days`,
neither at the next pass nor never. Before, the index kept saying Archive: the
lifecycle never looked at the pack again (it stayed Hot, at Hot's price), and
the web answered its next recall as an hours-long rehydration.

The lifecycle pass runs in-process (`apply_lifecycle`, what the agent runs
hourly); the recall is the real `pacs-edge recall`; the cloud is the product's
local-folder blob store, which rehydrates at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import dicomgen
import tomlkit
from conftest import init_home, run_pacs_edge
from syncagent import sync_once

DAY = 86400.0
ARCHIVE_AFTER_DAYS = 5.0


def packs(home: Path) -> list[tuple[str, str, float | None]]:
    """(pack blob name, access tier, rehydrated_at) of every pack, as the index records."""
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return [(str(name), str(tier), at) for name, tier, at in db.execute(
            "SELECT pack_name, access_tier, rehydrated_at FROM packs ORDER BY id")]
    finally:
        db.close()


def age_the_packs(home: Path, days: float) -> None:
    """Move every pack's creation and last rehydration `days` into the past."""
    db = sqlite3.connect(home / "index.sqlite3")
    try:
        with db:
            db.execute("UPDATE packs SET created_at = created_at - ?,"
                       " rehydrated_at = rehydrated_at - ?", (days * DAY, days * DAY))
    finally:
        db.close()


def lifecycle_pass(home: Path) -> int:
    """One pass of the agent's lifecycle job; how many packs it moved."""
    from appliance.base.config import load_config
    from sync.context import open_context
    from sync.lifecycle import apply_lifecycle

    async def run() -> int:
        async with open_context(load_config(home)) as ctx:
            return await apply_lifecycle(ctx)

    return asyncio.run(run())


def cloud_tier(home: Path, name: str) -> str:
    from sync.blobstore.local import LocalFolderStore

    return LocalFolderStore(home / "cloud").stat(name).tier.value


def test_a_recalled_archived_pack_is_hot_in_the_index_and_ages_again_from_its_recall(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=32, series_per_study=1,
                                  instances_per_series=3, size=64)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
    config = home / "pacs-edge.toml"
    doc = tomlkit.parse(config.read_text())
    doc["sync"]["archive_after_days"] = ARCHIVE_AFTER_DAYS  # type: ignore[index]
    doc["sync"]["rehydrate_poll_seconds"] = 0.5  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))
    sync_once(home)
    [(name, tier, _)] = packs(home)
    assert tier == "Hot"

    age_the_packs(home, 2 * ARCHIVE_AFTER_DAYS)
    assert lifecycle_pass(home) == 1
    assert packs(home)[0][1] == cloud_tier(home, name) == "Archive"

    study_uid = study[0].study_uid
    run_pacs_edge("evict", study_uid, "--home", str(home))
    before = time.time()
    assert "recalled 3 instance(s)" in run_pacs_edge("recall", study_uid, "--home",
                                                     str(home)).stdout
    [(_, tier, rehydrated_at)] = packs(home)
    assert (tier, cloud_tier(home, name)) == ("Hot", "Hot")
    assert rehydrated_at is not None and rehydrated_at >= before

    # Created long ago, but rehydrated just now: the next pass leaves it Hot ...
    assert lifecycle_pass(home) == 0
    assert cloud_tier(home, name) == "Hot"
    # ... and once it is archive_after_days past its recall, it goes back to Archive.
    age_the_packs(home, ARCHIVE_AFTER_DAYS + 1)
    assert lifecycle_pass(home) == 1
    assert packs(home)[0][1] == cloud_tier(home, name) == "Archive"
