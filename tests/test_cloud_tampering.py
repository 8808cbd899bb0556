"""A blob of the cloud copy edited outside its AEAD-protected bytes is reported as tampering;
one whose magic names a newer format says "upgrade", whichever command reads it.

The magic, kind and reserved fields of packs, manifests and site key objects
come before (or beside) what AES-GCM authenticates. An edit there made
`pacs-edge recall` say "not in a format this version of pacs-edge reads;
upgrade", with no security alert in the audit log, though the index records
these blobs as written and verified by this very box. `pacs-edge restore`
said so too (its failure line: "not a manifest blob (magic)"), while a remote
reader's `reader pull` called every such blob tampered, a newer format's as
well. The rule is sync.pack.blob_format's: the blob's name says what kind it
is, the magic's last two digits its format version; a higher version is a
newer pacs-edge's, anything else that does not parse is damage.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, run_pacs_edge
from syncagent import evict, security_alerts, sync_once

pytestmark = pytest.mark.slow  # replicates, evicts and recalls a real study


def _flip(offset: int, bits: int = 1) -> Callable[[bytes], bytes]:
    return lambda blob: blob[:offset] + bytes([blob[offset] ^ bits]) + blob[offset + 1:]


DAMAGE = {  # blob name suffix, edit: each outside the bytes AES-GCM authenticates
    "pack magic": (".pack", _flip(0)),
    "pack reserved field": (".pack", _flip(31)),
    "manifest magic": (".manifest", _flip(0)),
    "site key object magic": (".keys/site", _flip(0)),
    "site key object kind": (".keys/site", _flip(7)),
}
# The version digits "01" of each magic made "02": what a newer pacs-edge would write.
NEWER = {
    "pack format 02": (".pack", _flip(7, 3)),
    "manifest format 02": (".manifest", _flip(7, 3)),
    "site key object format 02": (".keys/site", _flip(6, 3)),
}
READER_DAMAGE = {
    "reader key object magic": ("reader", _flip(0)),
    "reader key object kind": ("reader", _flip(7)),
    "pack magic": (".pack", _flip(0)),
    "pack reserved field": (".pack", _flip(31)),
    "manifest magic": (".manifest", _flip(0)),
}
READER_NEWER = {
    "reader key object format 02": ("reader", _flip(6, 3)),
    "pack format 02": (".pack", _flip(7, 3)),
    "manifest format 02": (".manifest", _flip(7, 3)),
}


def _blob(cloud: Path, suffix: str) -> Path:
    blob, = (p for p in (cloud / "studies").rglob("*")
             if p.is_file() and not p.name.startswith(".")
             and (str(p).endswith(suffix) or p.name.startswith(suffix)))
    return blob


@contextlib.contextmanager
def _edited(cloud: Path, suffix: str, edit: Callable[[bytes], bytes]) -> Iterator[None]:
    """One blob edited for the duration, then put back."""
    blob = _blob(cloud, suffix)
    original = blob.read_bytes()
    blob.write_bytes(edit(original))
    try:
        yield
    finally:
        blob.write_bytes(original)


def _refused(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that failed with an expected error (exit 2)."""
    said = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in said, said
    return said


def test_an_edited_header_of_a_pack_manifest_or_key_object_is_reported_as_tampering(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    study = dicomgen.make_study(tmp_path / "study", seed=941)
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in study))
    assert "replicated 1 study version" in sync_once(home).stdout
    uid = study[0].study_uid
    evict(home, uid)
    def recall() -> str:
        return _refused(run_pacs_edge("recall", uid, "--home", str(home), check=False))

    for what, (suffix, edit) in DAMAGE.items():
        alerts = security_alerts(home)
        with _edited(home / "cloud", suffix, edit):
            said = recall()
        assert "modified" in said and "do not trust it" in said, (what, said)
        assert "upgrade" not in said, (what, said)
        assert security_alerts(home) == alerts + 1, what
    for what, (suffix, edit) in NEWER.items():
        alerts = security_alerts(home)
        with _edited(home / "cloud", suffix, edit):
            said = recall()
        assert "format 02" in said and "upgrade" in said, (what, said)
        assert "modified" not in said, (what, said)
        assert security_alerts(home) == alerts, what
    assert "recalled 6 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout


@dataclass(frozen=True)
class LostBox:
    """A study replicated to a folder cloud, its box's keys escrowed and recovered into
    a new home (not restored yet), and a remote reader granted the study."""

    cloud: Path
    new: Path
    reader: Path
    study_uid: str


@pytest.fixture(scope="module")
def lost_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LostBox]:
    work = tmp_path_factory.mktemp("lost-box")
    cloud, old, new = work / "cloud", work / "old", work / "new"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    study = dicomgen.make_study(work / "study", seed=947)
    run_pacs_edge("import", "--home", str(old), *(str(i.path) for i in study))
    assert "replicated 1 study version" in sync_once(old).stdout
    passphrase = work / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    run_pacs_edge("keys", "escrow", "--home", str(old), "--out", str(work / "escrow"),
                  "--passphrase-file", str(passphrase))
    run_pacs_edge("keys", "recover", "--home", str(new), "--from", str(work / "escrow"),
                  "--passphrase-file", str(passphrase))
    init_home(new)
    key = run_pacs_edge("reader", "init", "--home", str(work / "reader"), "--cloud",
                        f"file://{cloud}").stdout.strip().splitlines()[-1]
    run_pacs_edge("readers", "add", "r", key, "--home", str(old))
    yield LostBox(cloud, new, work / "reader", study[0].study_uid)


def test_restore_tells_an_edited_manifest_or_key_object_from_a_newer_format(
        lost_box: LostBox) -> None:
    def restore() -> str:
        return _refused(run_pacs_edge("restore", "--home", str(lost_box.new), "--cloud",
                                      f"file://{lost_box.cloud}", check=False))

    for what, (suffix, edit) in DAMAGE.items():
        if suffix == ".pack":
            continue  # restore reads a pack's size from the listing, not its bytes
        with _edited(lost_box.cloud, suffix, edit):
            said = restore()
        assert "(modified or damaged)" in said and "upgrade" not in said, (what, said)
    for what, (suffix, edit) in NEWER.items():
        if suffix == ".pack":
            continue
        with _edited(lost_box.cloud, suffix, edit):
            said = restore()
        assert "is in format 02, which only a newer pacs-edge reads (this one reads 01): " \
            "upgrade" in said, (what, said)
        assert "modified" not in said, (what, said)
    assert "restored 1 pack version(s)" in run_pacs_edge(
        "restore", "--home", str(lost_box.new), "--cloud", f"file://{lost_box.cloud}").stdout


def test_reader_pull_tells_an_edited_blob_from_a_newer_format(lost_box: LostBox,
                                                              tmp_path: Path) -> None:
    def reader(*args: str) -> subprocess.CompletedProcess[str]:
        return run_pacs_edge("reader", *args, "--home", str(lost_box.reader), check=False)

    def pull() -> subprocess.CompletedProcess[str]:
        return reader("pull", lost_box.study_uid, "--to", str(tmp_path / "pulled"))

    for what, (prefix, edit) in READER_DAMAGE.items():
        with _edited(lost_box.cloud, prefix, edit):
            said = _refused(pull())
        assert "hint: the cloud copy was modified" in said, (what, said)
        assert "upgrade" not in said, (what, said)
    for what, (prefix, edit) in READER_NEWER.items():
        with _edited(lost_box.cloud, prefix, edit):
            said = _refused(pull())
            # The listing opens key objects and manifests, not packs.
            listed = "" if prefix == ".pack" else _refused(reader("list"))
        assert "only a newer pacs-edge reads" in said, (what, said)
        assert "hint: the site's edge runs a newer pacs-edge than this machine: upgrade" \
            in said, (what, said)
        assert "modified" not in said + listed, (what, said, listed)
        assert prefix == ".pack" or "upgrade pacs-edge here" in listed, (what, listed)
    assert pull().returncode == 0


def test_a_reader_key_object_cut_short_is_tampering_not_a_traceback(lost_box: LostBox,
                                                                   tmp_path: Path) -> None:
    """The reader took a key object's pack_id as its bytes 8..24 before parsing it: one
    cut inside them made `reader list` and `reader pull` end in a ValueError traceback
    ("pack_id must be 16 bytes"), a newer format's as well."""
    def reader(*args: str) -> str:
        return _refused(run_pacs_edge("reader", *args, "--home", str(lost_box.reader),
                                      check=False))

    pull = ("pull", lost_box.study_uid, "--to", str(tmp_path / "pulled"))
    for cut in (0, 7, 20):
        with _edited(lost_box.cloud, "reader", lambda blob, cut=cut: blob[:cut]):
            for args in (("list",), pull):
                said = reader(*args)
                assert "hint: the cloud copy was modified" in said, (cut, args, said)
    with _edited(lost_box.cloud, "reader", lambda blob: _flip(6, 3)(blob)[:20]):
        for args in (("list",), pull):
            said = reader(*args)
            assert "only a newer pacs-edge reads" in said and "modified" not in said, said
