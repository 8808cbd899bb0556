"""A site key rotation never leaves a pack that the site's escrow cannot open.

The escrow file is how a lost box comes back, and it holds the key that was
current when it was made. These tests lose the box (a new data home, the
escrow recovered into it, `pacs-edge restore`) at each point of a rotation:
after a run that could not finish because the new key is not escrowed yet,
after a run killed half way, and after the next run was killed while it
deleted the old wraps. Every study must come back each time, and recall.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, pacs_edge_command, run_pacs_edge
from syncagent import sync_once

from provisioning.keyring import key_id

PASSPHRASE = "correct horse battery staple"

pytestmark = pytest.mark.slow  # replicates, evicts, escrows (scrypt) and restores


@pytest.fixture
def escrowed_home(tmp_path: Path) -> Iterator[Path]:
    """A home whose two studies are in the cloud only, its site key escrowed (old.escrow)."""
    home = init_home(tmp_path / "home", evict_without_escrow=False)
    studies = [dicomgen.make_study(tmp_path / f"study-{n}", seed=910 + n) for n in (1, 2)]
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for s in studies for i in s))
    assert "replicated 2 study version" in sync_once(home).stdout
    _escrow(home, tmp_path / "old.escrow")
    for study in studies:
        run_pacs_edge("evict", study[0].study_uid, "--home", str(home))
    home.joinpath("studies.txt").write_text("\n".join(s[0].study_uid for s in studies))
    yield home


def _passphrase_file(folder: Path) -> Path:
    path = folder / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


def _escrow(home: Path, out: Path) -> str:
    return run_pacs_edge("keys", "escrow", "--home", str(home), "--out", str(out),
                         "--passphrase-file", str(_passphrase_file(out.parent))).stdout


def _rotate(home: Path, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PACS_EDGE_HOME"}
    if crash_at:
        env["PACS_EDGE_CRASH_AT"] = crash_at
    return subprocess.run([*pacs_edge_command(), "keys", "rotate", "--home", str(home)],
                          capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def _lose_the_box(home: Path, escrow: Path, new: Path) -> None:
    """Recover `escrow` into the new home `new`, restore `home`'s cloud there, recall all."""
    run_pacs_edge("keys", "recover", "--home", str(new), "--from", str(escrow),
                  "--passphrase-file", str(_passphrase_file(escrow.parent)))
    init_home(new)
    restored = run_pacs_edge("restore", "--home", str(new), "--cloud",
                             (home / "cloud").as_uri(), check=False)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restored 2 pack version(s) of 2 study(ies), 12 instance(s)" in restored.stdout
    for uid in home.joinpath("studies.txt").read_text().split():
        recalled = run_pacs_edge("recall", uid, "--home", str(new)).stdout
        assert "recalled 6 instance(s)" in recalled, recalled


def _site_objects(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "cloud").rglob("*.keys/*")
                  if not p.name.startswith("."))


@pytest.mark.parametrize("crash_at", [None, "rotate:after-new-wrap"])
def test_a_box_lost_before_the_new_key_is_escrowed_comes_back_from_the_old_escrow(
        escrowed_home: Path, tmp_path: Path, crash_at: str | None) -> None:
    """The rotation deleted each pack's old wrap as soon as its new one was written, and
    `keys escrow` was refused until the rotation ended: a box lost in between (or after
    a finished rotation, before the new escrow) took every re-wrapped pack with it."""
    home = escrowed_home
    old_id = key_id((home / "secrets" / "site.key").read_bytes())
    if crash_at:  # killed at the first put, then at the next (the second pack's, before)
        assert _rotate(home, crash_at).returncode == -9
        assert _rotate(home, crash_at).returncode == -9
    else:
        proc = _rotate(home)
    _lose_the_box(home, tmp_path / "old.escrow", tmp_path / "new")
    assert (home / "secrets" / f"site.key.{old_id}").exists()
    if not crash_at:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (f"the old site key {old_id} and its wraps are kept" in proc.stdout
                and "then run `pacs-edge keys rotate` again" in proc.stdout), proc.stdout


def test_the_new_escrow_opens_every_pack_while_the_old_wraps_are_deleted(
        escrowed_home: Path, tmp_path: Path) -> None:
    """Escrowed mid-rotation, the new key opens every pack; a run killed between the
    deletions of old wraps leaves packs with an old and a new wrap, which a box holding
    only the new key reads with the new one."""
    home = escrowed_home
    old_id = key_id((home / "secrets" / "site.key").read_bytes())
    assert _rotate(home).returncode == 0
    new_id = key_id((home / "secrets" / "site.key").read_bytes())
    assert len(_site_objects(home)) == 4  # both wraps of both packs
    escrowed = _escrow(home, tmp_path / "new.escrow")
    assert f"site key {new_id}" in escrowed and "run `pacs-edge keys rotate`" in escrowed

    assert _rotate(home, "rotate:after-old-wrap-deleted").returncode == -9
    assert _site_objects(home) == sorted(["site", f"site-{new_id}", f"site-{new_id}"])
    _lose_the_box(home, tmp_path / "new.escrow", tmp_path / "new")

    proc = _rotate(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"retired the old site key(s): {old_id}" in proc.stdout
    assert _site_objects(home) == [f"site-{new_id}"] * 2
