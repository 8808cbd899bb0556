"""`pacs-edge keys rotate`, end to end, on the local-folder cloud and on a real Azurite.

Studies are imported, replicated with `pacs-edge sync --once` and evicted,
so the only copy is the cloud's; after a rotation (also one killed half way
and resumed) they are recalled with the new key alone. Pack and manifest
blobs must come out of it untouched: only the small site key objects change.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dicomgen
import pytest
import tomlkit
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from syncagent import SyncAgent, evict, sync_once

from provisioning.keyring import key_id
from sync.blobstore.base import BlobStore
from sync.blobstore.factory import open_blob_store
from sync.pack import naming
from sync.pack.data_keys import site_key_id, unwrap_with_site
from sync.pack.manifest import manifest_pack_id
from sync.pack.pack_errors import WrongKeyError

CRASH_ENV = "PACS_EDGE_CRASH_AT"

pytestmark = pytest.mark.slow  # every case replicates, evicts and recalls real studies


@pytest.fixture(params=["local", "azurite"])
def cloud_home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A data home with two replicated, evicted studies in its cloud."""
    home = init_home(tmp_path / "home")
    if request.param == "azurite":
        connection = request.getfixturevalue("azurite")
        credentials = home / "azure.conn"
        credentials.write_text(connection)
        credentials.chmod(0o600)
        path = home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text())
        doc["cloud"]["url"] = f"azure://rotate-{secrets.token_hex(6)}"  # type: ignore[index]
        doc["cloud"]["credentials_file"] = str(credentials)  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc))
    studies = [dicomgen.make_study(tmp_path / f"study-{n}", seed=700 + n) for n in (1, 2)]
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for s in studies for i in s))
    assert "replicated 2 study version" in sync_once(home).stdout
    for study in studies:
        evict(home, study[0].study_uid)
    home.joinpath("studies.txt").write_text("\n".join(s[0].study_uid for s in studies))
    yield home


def _store(home: Path) -> BlobStore:
    from appliance.base.config import load_config

    config = load_config(home)
    return open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)


def _blobs(home: Path) -> dict[str, str]:
    """name -> SHA-256 of every blob in the home's cloud."""
    store = _store(home)
    try:
        return {info.name: hashlib.sha256(store.open_range(info.name)).hexdigest()
                for info in store.list(naming.STUDIES_PREFIX)}
    finally:
        store.close()


def _site_key(home: Path, name: str = "site.key") -> bytes:
    return (home / "secrets" / name).read_bytes()


def _study_uids(home: Path) -> list[str]:
    return home.joinpath("studies.txt").read_text().split()


def _recall_all(home: Path) -> None:
    for uid in _study_uids(home):
        out = run_pacs_edge("recall", uid, "--home", str(home)).stdout
        assert "recalled 6 instance(s)" in out
        evict(home, uid)


def _rotate(home: Path, *, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PACS_EDGE_HOME", None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([*pacs_edge_command(), "keys", "rotate", "--home", str(home)],
                          capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def _pack_count(home: Path) -> int:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM packs").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("cloud_home", ["local"], indirect=True)
def test_rotation_says_eviction_waits_for_the_new_escrow(cloud_home: Path) -> None:
    """The rotation's last line is what a fleet run shows per box: it must say that the
    box evicts nothing until the new key is escrowed (or that it evicts anyway)."""
    EdgeServer(cloud_home).configure(sync={"evict_without_escrow": False})
    proc = _rotate(cloud_home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "escrow the new site key now (`pacs-edge keys escrow --out FILE`)" in proc.stdout
    assert "until then nothing is evicted" in proc.stdout, proc.stdout
    EdgeServer(cloud_home).configure(sync={"evict_without_escrow": True})
    proc = _rotate(cloud_home)
    assert "the agent evicts anyway ([sync] evict_without_escrow = true)" in proc.stdout


def test_rotation_rewraps_every_pack_and_leaves_pack_data_untouched(cloud_home: Path) -> None:
    home = cloud_home
    old_key = _site_key(home)
    before = _blobs(home)
    site_objects = sorted(n for n in before if n.endswith(".keys/site"))
    assert len(site_objects) == _pack_count(home) == 2

    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new_key = _site_key(home)
    new_id = key_id(new_key)
    assert new_key != old_key and new_id == site_key_id(new_key)
    assert f"new site key {new_id}: re-wrapped 2 pack(s)" in proc.stdout
    assert f"retired the old site key(s): {key_id(old_key)}" in proc.stdout
    assert sorted(p.name for p in (home / "secrets").glob("site.key*")) == ["site.key"]

    after = _blobs(home)
    # Packs and manifests: same names, same bytes. Site objects: renamed, re-wrapped.
    assert {n: h for n, h in after.items() if ".keys/" not in n} == {
        n: h for n, h in before.items() if ".keys/" not in n}
    assert sorted(n for n in after if ".keys/" in n) == [f"{n}-{new_id}" for n in site_objects]

    store = _store(home)
    try:
        for name in site_objects:
            manifest = name.removesuffix("keys/site") + "manifest"
            pack_id = manifest_pack_id(store.open_range(manifest))
            wrapped = store.open_range(f"{name}-{new_id}")
            unwrap_with_site(new_key, pack_id, wrapped)
            with pytest.raises(WrongKeyError):
                unwrap_with_site(old_key, pack_id, wrapped)
    finally:
        store.close()
    _recall_all(home)

    # A second rotation re-wraps the rotated objects again and retires the first new key.
    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    newest = key_id(_site_key(home))
    assert sorted(n for n in _blobs(home) if ".keys/" in n) == [
        f"{n}-{newest}" for n in site_objects]
    _recall_all(home)


@pytest.mark.parametrize("crash_at", ["rotate:after-new-key", "rotate:after-new-wrap",
                                      "rotate:before-retire"])
def test_rotation_killed_half_way_resumes_and_packs_stay_readable(
        cloud_home: Path, crash_at: str) -> None:
    home = cloud_home
    old_id = key_id(_site_key(home))
    proc = _rotate(home, crash_at=crash_at)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    new_id = key_id(_site_key(home))
    assert new_id != old_id
    # The old key is still on the box while any wrap may need it ...
    assert (home / "secrets" / f"site.key.{old_id}").exists()
    # ... and every study can be recalled in the middle of the rotation.
    _recall_all(home)

    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed the interrupted rotation to site key {new_id}" in proc.stdout
    assert not (home / "secrets" / f"site.key.{old_id}").exists()
    assert sorted(n for n in _blobs(home) if ".keys/" in n) == sorted(
        f"{n}-{new_id}" for n, _ in _site_names(home))
    _recall_all(home)


def _restore_elsewhere(home: Path, new_home: Path) -> str:
    """`restore` of `home`'s cloud into a new data home holding `home`'s current keys."""
    (new_home / "secrets").mkdir(parents=True)
    for secret in ("site.key", "names.key"):  # what `keys recover` would write
        shutil.copy2(home / "secrets" / secret, new_home / "secrets" / secret)
    init_home(new_home)
    cloud = tomlkit.parse((home / "pacs-edge.toml").read_text())["cloud"]
    credentials = cloud.get("credentials_file")  # type: ignore[union-attr]
    if credentials:
        path = new_home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text())
        doc["cloud"]["credentials_file"] = credentials  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc))
    url = str(cloud.get("url") or (home / "cloud").as_uri())  # type: ignore[union-attr]
    return run_pacs_edge("restore", "--home", str(new_home), "--cloud", url).stdout


@pytest.mark.parametrize("crash_at", [None, "rotate:after-new-wrap"])
def test_rotation_rewraps_the_versions_the_index_does_not_know(
        cloud_home: Path, tmp_path: Path, crash_at: str | None) -> None:
    """After an index rebuilt by `fsck --repair` the cloud keeps versions the index does
    not know (the agent uploads above them; `restore` reads them). The rotation re-wrapped
    the index's packs only, then retired the old key: nothing opened those versions."""
    home = cloud_home
    old_id = key_id(_site_key(home))
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    third = dicomgen.make_study(tmp_path / "study-3", seed=703)
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in third))
    assert "replicated 1 study version" in sync_once(home).stdout
    assert _pack_count(home) == 1  # the cloud holds 3 versions

    if crash_at:
        proc = _rotate(home, crash_at=crash_at)
        assert proc.returncode == -9, proc.stdout + proc.stderr
        assert (home / "secrets" / f"site.key.{old_id}").exists()
    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (home / "secrets" / f"site.key.{old_id}").exists()
    new_id = key_id(_site_key(home))
    site_objects = [n for n in _blobs(home) if ".keys/" in n]
    assert len(site_objects) == 3, site_objects
    assert all(n.endswith(f".keys/site-{new_id}") for n in site_objects), site_objects

    new_home = tmp_path / "new-home"
    restored = _restore_elsewhere(home, new_home)
    assert "restored 3 pack version(s) of 3 study(ies), 18 instance(s)" in restored, restored
    uid = _study_uids(home)[0]
    recalled = run_pacs_edge("recall", uid, "--home", str(new_home)).stdout
    assert "recalled 6 instance(s)" in recalled


def test_rotation_keeps_the_old_key_for_a_version_it_cannot_check(cloud_home: Path) -> None:
    """A version only the cloud knows whose manifest is gone (a new wrap cannot be proven
    to open it) keeps the old key on the box until the manifest is back."""
    home = cloud_home
    old_id = key_id(_site_key(home))
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    store = _store(home)
    try:
        manifest = next(i.name for i in store.list(naming.STUDIES_PREFIX)
                        if i.name.endswith(".manifest"))
        sealed = store.open_range(manifest)
        store.delete(manifest)
        proc = _rotate(home)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"failed: {manifest.removesuffix('manifest')}pack" in proc.stderr
        assert "no manifest" in proc.stderr
        assert (home / "secrets" / f"site.key.{old_id}").exists()
        store.put(manifest, [sealed])  # restored from the account's soft delete
    finally:
        store.close()
    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-wrapped 1 pack(s), 1 already done" in proc.stdout
    assert not (home / "secrets" / f"site.key.{old_id}").exists()


@pytest.mark.parametrize("cloud_home", ["local"], indirect=True)
def test_rotation_stops_at_a_store_that_stopped_answering(cloud_home: Path,
                                                          tmp_path: Path) -> None:
    """Once the store is unavailable (its retries spent), every further version would wait
    out the same retries: over Azure, hours for a large container. The walk stops there."""
    home, pause = cloud_home, tmp_path / "pause"
    pause.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PACS_EDGE_HOME"}
    env.update(PACS_EDGE_PAUSE_AT="rotate:after-new-wrap", PACS_EDGE_PAUSE_DIR=str(pause))
    proc = subprocess.Popen([*pacs_edge_command(), "keys", "rotate", "--home", str(home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (pause / "reached").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        (home / "cloud").rename(home / "cloud.away")  # the store's folder unusable: a
        (home / "cloud").symlink_to(home / "cloud")   # link loop fails every call (ELOOP)
        (pause / "go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert err.count("  failed: studies/") == 1 and "1 version(s) not tried" in err, err
    (home / "cloud").unlink()
    (home / "cloud.away").rename(home / "cloud")
    resumed = _rotate(home)
    assert resumed.returncode == 0 and "resumed the interrupted rotation" in resumed.stdout


@pytest.mark.parametrize("cloud_home", ["local"], indirect=True)
def test_restore_with_the_key_from_before_a_rotation_names_the_newer_key(
        cloud_home: Path, tmp_path: Path) -> None:
    """A box recovered from an escrow made before the rotation finds only `keys/site-<new
    id>` objects: "no site key object" would send the operator after a damaged cloud copy
    instead of the newer escrow file."""
    home, new = cloud_home, tmp_path / "new"
    old_key = _site_key(home)
    assert _rotate(home).returncode == 0
    new_id = key_id(_site_key(home))
    (new / "secrets").mkdir(parents=True)
    (new / "secrets" / "site.key").write_bytes(old_key)  # what the old escrow holds
    (new / "secrets" / "site.key").chmod(0o600)
    shutil.copy2(home / "secrets" / "names.key", new / "secrets" / "names.key")
    init_home(new)
    result = run_pacs_edge("restore", "--home", str(new), "--cloud", (home / "cloud").as_uri(),
                           check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count(f".manifest: wrapped only with site key(s) {new_id}, which "
                               "this box does not hold") == 2, result.stderr
    # Nothing came back: the URL is not recorded, so the run with the newer escrow may
    # name it again.
    assert "the URL was not recorded" in result.stderr


def test_rotation_is_refused_while_the_sync_agent_runs(cloud_home: Path) -> None:
    agent = SyncAgent(cloud_home).start()
    try:
        proc = _rotate(cloud_home)
    finally:
        assert agent.stop() == 0
    assert proc.returncode == 2
    assert "the sync agent" in proc.stderr and "systemctl stop pacs-edge-sync" in proc.stderr
    assert sorted(p.name for p in (cloud_home / "secrets").glob("site.key*")) == ["site.key"]


def test_force_new_keys_is_refused_while_packs_are_in_the_cloud(cloud_home: Path) -> None:
    old = _site_key(cloud_home)
    proc = run_pacs_edge("init", "--home", str(cloud_home), "--force-new-keys", check=False)
    assert proc.returncode == 2
    assert "refusing --force-new-keys" in proc.stderr and "keys rotate" in proc.stderr
    assert _site_key(cloud_home) == old


def test_force_new_keys_on_a_new_home_makes_the_home(tmp_path: Path) -> None:
    """It exited 2 ("site.key: secret file is missing") and left a home with a config
    and no secrets: there was no key to replace yet."""
    home = tmp_path / "home"
    proc = run_pacs_edge("init", "--home", str(home), "--force-new-keys", "--dicom-port", "0",
                         check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (home / "secrets" / "site.key").stat().st_mode & 0o777 == 0o600
    assert run_pacs_edge("config", "check", "--home", str(home)).returncode == 0


def _site_names(home: Path) -> list[tuple[str, int]]:
    """The `keys/site` name of every pack row (whatever its object is called now)."""
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT pack_name FROM packs ORDER BY id")]
    finally:
        db.close()
    result = []
    for name in names:
        parsed = naming.parse_blob_name(name)
        assert parsed is not None
        result.append((naming.site_key_name(parsed.study_key, parsed.version), parsed.version))
    return result
