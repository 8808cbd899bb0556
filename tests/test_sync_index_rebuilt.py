"""An index rebuilt without `restore` never costs the cloud a version it holds; one
rebuilt with it never costs the store a file it holds.

The box loses its index (deleted, or damaged and moved away) while the store
still holds a study's late instance; `fsck --repair` adopts the file into a new,
empty index, so the index's next version of that study is 1 again, a version
the cloud already holds, and there the only copy of the evicted instances.
The sync agent must leave every blob of that version in place (it was another
upload's), upload the late instance above it, and a restore into a new data
home must then bring back every instance the box ever acknowledged.

Real processes throughout: `pacs-edge import`, `sync --once` (also killed by
SIGKILL mid-pass), `evict`, `fsck --repair`, `init`, `restore` and `recall`;
the cloud is a local folder or a real Azurite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from syncagent import evict, import_files, index_rows, sent_hashes, stored_hashes, sync_once


def cloud_contents(home: Path) -> dict[str, str]:
    """Name -> SHA-256 of every study blob, read through the product's blob store."""
    from appliance.base.config import load_config
    from sync.blobstore.factory import open_blob_store

    config = load_config(home)
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        return {info.name: hashlib.sha256(store.open_range(info.name)).hexdigest()
                for info in store.list("studies/")}
    finally:
        store.close()


def configure_cloud(home: Path, cloud: str | None, credentials: str | None) -> None:
    """Point the home at `cloud` (None: leave the default, which restore records)."""
    import tomlkit

    config = home / "pacs-edge.toml"
    doc = tomlkit.parse(config.read_text())
    if cloud is not None:
        doc["cloud"]["url"] = cloud  # type: ignore[index]
    if credentials is not None:
        secret = home / "secrets" / "azure.conn"
        secret.write_text(credentials)
        secret.chmod(0o600)
        doc["cloud"]["credentials_file"] = str(secret)  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))


@pytest.mark.parametrize("killed_first", [False, True], ids=["straight", "killed-mid-upload"])
@pytest.mark.parametrize("backend", ["local", "azurite"])
def test_an_index_rebuilt_by_fsck_leaves_the_clouds_versions_and_uploads_above_them(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, killed_first: bool,
) -> None:
    if backend == "azurite":
        cloud, credentials = f"azure://rebuilt-{uuid.uuid4().hex[:12]}", \
            request.getfixturevalue("azurite")
    else:
        cloud, credentials = f"file://{tmp_path / 'cloud'}", None
    home = init_home(tmp_path / "home")
    configure_cloud(home, cloud, credentials)
    study = dicomgen.make_studies(tmp_path / "study", seed=71, series_per_study=2,
                                  instances_per_series=3, size=64)
    *first, late = study
    import_files(home, *first)
    sync_once(home)
    evict(home, study[0].study_uid)  # the cloud's version 1 is the only copy of `first`
    import_files(home, late)
    before = cloud_contents(home)
    assert len(before) == 3  # pack, manifest and site key object of version 1

    # The index is lost; fsck --repair adopts the late instance into a new one.
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    adopted = run_pacs_edge("fsck", "--repair", "--home", str(home)).stdout
    assert adopted.count("adopted: ") == 1
    if killed_first:
        # Killed with an `uploading` row for version 1: the restarted agent's roll-back
        # must not take that row's name for its blobs either.
        proc = subprocess.run(
            [*pacs_edge_command(), "sync", "--once", "--stable-after", "0", "--home", str(home)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PACS_EDGE_CRASH_AT": "replicate:before-upload"})
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    result = sync_once(home)
    assert "replicated 1 study version(s)" in result.stdout, result.stdout + result.stderr
    assert "this index does not know; left in place" in result.stderr

    after = cloud_contents(home)
    assert {name: after[name] for name in before} == before  # version 1 untouched
    assert len(after) == 6 and all("/v000002" in name for name in after.keys() - before.keys())
    assert index_rows(home, "SELECT version, state FROM packs") == [(2, "verified")]

    # A new data home restored from the cloud holds every instance ever acknowledged.
    new_home = tmp_path / "new-home"
    (new_home / "secrets").mkdir(parents=True)
    for secret in ("site.key", "names.key"):  # what `keys recover` would write
        shutil.copy2(home / "secrets" / secret, new_home / "secrets" / secret)
    init_home(new_home)
    configure_cloud(new_home, None, credentials)
    restored = run_pacs_edge("restore", "--home", str(new_home), "--cloud", cloud).stdout
    assert "restored 2 pack version(s) of 1 study(ies), 6 instance(s)" in restored
    run_pacs_edge("recall", study[0].study_uid, "--home", str(new_home))
    assert stored_hashes(new_home) == sent_hashes(study)


def test_the_operator_guides_rebuild_of_a_lost_index_brings_back_every_study(
    tmp_path: Path,
) -> None:
    """docs/operator-guide.md, "A lost or damaged index": restore, then fsck --repair,
    on the same data home, for a study evicted, one replicated and still local, and
    one never replicated."""
    home = init_home(tmp_path / "home")
    cloud = f"file://{tmp_path / 'cloud'}"
    configure_cloud(home, cloud, None)
    evicted, replicated, never = (
        dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                              instances_per_series=3, size=64)
        for name, seed in (("evicted", 72), ("replicated", 73), ("never", 74)))
    import_files(home, *evicted, *replicated)
    sync_once(home)
    evict(home, evicted[0].study_uid)
    import_files(home, *never)

    for path in home.glob("index.sqlite3*"):
        path.unlink()
    restored = run_pacs_edge("restore", "--home", str(home), "--cloud", cloud).stdout
    assert "restored 2 pack version(s) of 2 study(ies), 6 instance(s)" in restored
    assert "kept 3 instance(s)" in restored  # the replicated study's files: still local
    adopted = run_pacs_edge("fsck", "--repair", "--home", str(home)).stdout
    assert adopted.count("adopted: ") == 3
    assert "replicated 1 study version(s)" in sync_once(home).stdout
    assert tier_states(home) == {evicted[0].study_uid: "evicted",
                                 replicated[0].study_uid: "replicated",
                                 never[0].study_uid: "replicated"}
    run_pacs_edge("recall", evicted[0].study_uid, "--home", str(home))
    assert stored_hashes(home) == sent_hashes([*evicted, *replicated, *never])
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


def tier_states(home: Path) -> dict[str, str]:
    return {str(uid): str(state) for uid, state in
            index_rows(home, "SELECT study_uid, tier_state FROM studies")}


def flip_a_byte(path: Path, offset: int) -> None:
    """Silent bit rot: one byte changed in place; size and modification time kept."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_rebuild_on_the_same_home_keeps_the_stores_files_though_the_cloud_rotted(
    edge_server_factory: Callable[..., EdgeServer], tmp_path: Path,
) -> None:
    """docs/operator-guide.md, "A lost or damaged index", where the cloud copy of a
    replicated study rotted in place (same size, same ETag) before the index was lost:
    restore keeps the store's intact files local, so the agent's start deletes none and
    the study is served from disk, no recall; a damaged local file is not trusted (its
    study comes back evicted but for its good files, and a recall repairs it)."""
    home = init_home(tmp_path / "home")
    cloud = tmp_path / "cloud"
    configure_cloud(home, f"file://{cloud}", None)
    kept, mixed = (dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                                         instances_per_series=3, size=64)
                   for name, seed in (("kept", 75), ("mixed", 76)))
    import_files(home, *kept, *mixed)
    sync_once(home)
    [(pack_name,)] = index_rows(home, "SELECT p.pack_name FROM packs p JOIN studies s"
                                f" ON p.study_fk = s.id WHERE s.study_uid = '{kept[0].study_uid}'")
    pack = cloud.joinpath(*str(pack_name).split("/"))
    flip_a_byte(pack, pack.stat().st_size // 2)  # the cloud's only copy of `kept` is bad
    [(damaged_path,)] = index_rows(home, "SELECT path FROM instances WHERE sop_uid ="
                                   f" '{mixed[0].sop_instance_uid}'")
    damaged = home / "store" / str(damaged_path)
    flip_a_byte(damaged, damaged.stat().st_size - 1)  # a bad local file, the cloud's is good

    for path in home.glob("index.sqlite3*"):
        path.unlink()
    restored = run_pacs_edge("restore", "--home", str(home), "--cloud", f"file://{cloud}")
    assert "restored 2 pack version(s) of 2 study(ies), 6 instance(s)" in restored.stdout
    assert "kept 5 instance(s)" in restored.stdout
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    started = sync_once(home)  # the agent's start-up sweep runs here
    assert "kept files of evicted instances that are no copy" in started.stderr
    assert tier_states(home) == {kept[0].study_uid: "replicated",
                                 mixed[0].study_uid: "evicted"}
    on_disk = stored_hashes(home)
    assert on_disk == {**sent_hashes([*kept, *mixed[1:]]),
                       mixed[0].sop_instance_uid: on_disk[mixed[0].sop_instance_uid]}
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    assert status["bytes_on_disk"] == sum(
        p.stat().st_size for p in (home / "store").rglob("*.dcm") if p != damaged)
    assert status["tier_states"]["replicated"] == 1 and status["tier_states"]["evicted"] == 1

    # Served from local disk: no agent runs, so a needed recall could not happen.
    server = edge_server_factory(home, start=False)
    server.configure(sync={"recall_timeout_seconds": 5.0})
    server.start()
    got = tmp_path / "got"
    dcmtk.getscu(server.port, {"StudyInstanceUID": kept[0].study_uid}, got).check()
    assert {dicomgen.dataset_bytes(p) for p in got.iterdir()} == {
        dicomgen.dataset_bytes(i.path) for i in kept}
    server.stop()

    run_pacs_edge("recall", mixed[0].study_uid, "--home", str(home))
    assert stored_hashes(home) == sent_hashes([*kept, *mixed])
    # A scrub finds the rotted pack; the local files are uploaded again as a new version.
    assert run_pacs_edge("scrub", "--all", "--home", str(home), check=False).returncode == 1
    assert "replicated 1 study version(s)" in sync_once(home).stdout
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


def _rebuilt_over_a_rotted_pack(tmp_path: Path, *, seed: int, archived: bool = False
                                ) -> tuple[Path, str, list[dicomgen.GeneratedInstance]]:
    """A replicated study whose pack then rotted in place (and with `archived`, went to
    the Archive tier), its index lost and rebuilt on the same home (restore, fsck
    --repair): (home, pack name, study), the study `replicated`, its files local."""
    from sync.blobstore.base import Tier
    from sync.blobstore.local import LocalFolderStore

    home = init_home(tmp_path / "home")
    cloud = tmp_path / "cloud"
    configure_cloud(home, f"file://{cloud}", None)
    study = dicomgen.make_studies(tmp_path / "sent", seed=seed, series_per_study=1,
                                  instances_per_series=3, size=64)
    import_files(home, *study)
    sync_once(home)
    [(pack_name,)] = index_rows(home, "SELECT pack_name FROM packs")
    pack = cloud.joinpath(*str(pack_name).split("/"))
    flip_a_byte(pack, pack.stat().st_size // 2)
    if archived:
        LocalFolderStore(cloud).set_tier(str(pack_name), Tier.ARCHIVE)
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("restore", "--home", str(home), "--cloud", f"file://{cloud}")
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    assert tier_states(home) == {study[0].study_uid: "replicated"}
    return home, str(pack_name), study


def test_evict_reads_a_pack_restore_recorded_before_it_deletes_the_only_good_copy(
        tmp_path: Path) -> None:
    """The cloud copy rotted in place before the index was lost; restore keeps the
    store's intact files local and the study `replicated`. Evicting it must not trust
    the pack restore never read: evict scrubs it first, finds the damage and deletes
    nothing; the next sync uploads the files again, and only then do they go."""
    home, _, study = _rebuilt_over_a_rotted_pack(tmp_path, seed=77)

    refused = run_pacs_edge("evict", study[0].study_uid, "--home", str(home), check=False)
    assert refused.returncode != 0
    assert "not replicated" in refused.stderr  # the damaged pack took its instances out
    assert stored_hashes(home) == sent_hashes(study)
    assert tier_states(home) == {study[0].study_uid: "local"}

    assert "replicated 1 study version(s)" in sync_once(home).stdout
    evict(home, study[0].study_uid)  # a pack this box uploaded and verified
    assert stored_hashes(home) == {}
    run_pacs_edge("recall", study[0].study_uid, "--home", str(home))
    assert stored_hashes(home) == sent_hashes(study)
    assert run_pacs_edge("fsck", "--home", str(home)).returncode == 0


def test_evict_deletes_nothing_on_the_word_of_an_archived_pack_restore_recorded(
        tmp_path: Path) -> None:
    """As above, but the rotted pack had been moved to the Archive tier (as the lifecycle
    does with every pack in time): the read-back scrub skips an archived pack, and evict
    took the skip for a pass and deleted the only good copy. Now it refuses; once the
    pack is readable again, evict reads it and finds the damage."""
    from sync.blobstore.base import Tier
    from sync.blobstore.local import LocalFolderStore

    home, pack_name, study = _rebuilt_over_a_rotted_pack(tmp_path, seed=78, archived=True)

    refused = run_pacs_edge("evict", study[0].study_uid, "--home", str(home), check=False)
    assert refused.returncode != 0, refused.stdout
    assert "was never read by this box and cannot be read now (archived" in refused.stderr
    assert stored_hashes(home) == sent_hashes(study)
    assert tier_states(home) == {study[0].study_uid: "replicated"}

    LocalFolderStore(tmp_path / "cloud").set_tier(pack_name, Tier.HOT)  # rehydrated: read
    refused = run_pacs_edge("evict", study[0].study_uid, "--home", str(home), check=False)
    assert "not replicated" in refused.stderr  # the damage is found: files kept, re-upload
    assert stored_hashes(home) == sent_hashes(study)
