"""`keys rotate` and `keys escrow` on a full disk: one `error:` line naming the file
and the full disk (no traceback), no secret file left empty, half-written or as a temp,
the old site key still opening every pack, and the command done once there is room."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, pacs_edge_command, run_pacs_edge
from smalldisk import NEEDS_ROOT, fill, no_reserve, tmpfs
from syncagent import evict, import_files, sync_once

from appliance.base.durable import atomic_write
from appliance.base.errors import OutOfSpace

pytestmark = NEEDS_ROOT

PASSPHRASE = "correct horse battery staple\n"


@pytest.fixture
def full_home(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """(home, study UID, filler): a home on a small file system, its one study
    replicated and evicted, then every free block taken by the filler."""
    with tmpfs(tmp_path / "small", 16) as mount:
        home = no_reserve(init_home(mount / "home"))
        study = dicomgen.make_study(tmp_path / "study", seed=41, instances_per_series=2, size=64)
        import_files(home, *study)
        sync_once(home)
        evict(home, study[0].study_uid)
        yield home, study[0].study_uid, fill(mount)


def _pacs_edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pacs_edge_command(), *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def _says_no_space_in_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error, hint = [line for line in proc.stderr.splitlines() if line]  # a progress bar's end
    assert error.startswith("error: No space left on device: "), error
    assert hint == "hint: free disk space"


def _secrets(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (home / "secrets").iterdir()}


def _recalls(home: Path, study_uid: str) -> None:
    assert "recalled 4 instance(s)" in run_pacs_edge("recall", study_uid, "--home",
                                                     str(home)).stdout
    evict(home, study_uid)


def test_key_rotation_on_a_full_disk_says_no_space_and_keeps_the_old_key(
        full_home: tuple[Path, str, Path]) -> None:
    home, study_uid, filler = full_home
    before = _secrets(home)
    _says_no_space_in_one_line(_pacs_edge("keys", "rotate", "--home", str(home)))
    assert _secrets(home) == before
    filler.unlink()
    _recalls(home, study_uid)
    rotated = _pacs_edge("keys", "rotate", "--home", str(home))
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert _secrets(home)["site.key"] != before["site.key"]
    _recalls(home, study_uid)


def test_key_escrow_on_a_full_disk_says_no_space_and_writes_no_escrow_file(
        full_home: tuple[Path, str, Path], tmp_path: Path) -> None:
    home, _, filler = full_home
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    escrow = filler.parent / "escrow.bin"
    before = _secrets(home)
    _says_no_space_in_one_line(_pacs_edge("keys", "escrow", "--home", str(home), "--out",
                                          str(escrow), "--passphrase-file", str(passphrase)))
    assert not escrow.exists() and not (home / "escrow.json").exists()
    assert sorted(p.name for p in filler.parent.iterdir()) == ["filler.bin", "home"]
    assert set(_secrets(home)) <= set(before) | {"audit.key"}
    filler.unlink()
    run_pacs_edge("keys", "escrow", "--home", str(home), "--out", str(escrow),
                  "--passphrase-file", str(passphrase))
    recovered = tmp_path / "recovered"
    run_pacs_edge("keys", "recover", "--home", str(recovered), "--from", str(escrow),
                  "--passphrase-file", str(passphrase))
    assert (recovered / "secrets" / "site.key").read_bytes() == before["site.key"]


def test_a_file_replaced_whole_on_a_full_disk_is_named_in_the_error(tmp_path: Path) -> None:
    """atomic_write (secrets, the readers registry, the audit anchor, ...) on a full disk
    said "no space left on the store's file system", the store's words, whatever file
    it was writing (a `keys rotate` at its `site.key.next`)."""
    with tmpfs(tmp_path / "small", 1) as mount:
        target = mount / "secrets" / "site.key.next"
        target.parent.mkdir()
        fill(mount)
        with pytest.raises(OutOfSpace) as refused:
            atomic_write(target, b"k" * 8192, mode=0o600)
        assert refused.value.message == f"no space left to write {target}"
        assert not target.exists() and list(target.parent.iterdir()) == []
