"""The series metadata cache stays within [http] metadata_cache_mb: the files used least
recently go first, a hit counts as a use, and a file used in the last minute stays."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import dicomgen
import pytest
from crashfs import CrashFS

from appliance.services import series_metadata
from appliance.services.series_metadata import IN_USE_SECONDS, SeriesMetadataCache

BASE = "https://box.example:8443/dicom-web"


def _series(tmp_path: Path) -> dict[str, list[tuple[str, str, Path, str]]]:
    """Four series of three instances each, as the cache is given them."""
    members: dict[str, list[tuple[str, str, Path, str]]] = defaultdict(list)
    for study in range(2):
        for instance in dicomgen.make_study(tmp_path / f"s{study}", seed=90 + study):
            members[str(instance.header.SeriesInstanceUID)].append(
                (instance.sop_instance_uid, "0" * 64, instance.path, instance.transfer_syntax))
    assert len(members) == 4
    return members


def test_the_cache_keeps_the_series_used_most_recently_within_its_bound(
        tmp_path: Path) -> None:
    series = _series(tmp_path)
    unbounded = SeriesMetadataCache(tmp_path / "cache", max_bytes=1 << 30)
    long_ago = time.time() - 10 * IN_USE_SECONDS
    files = {}
    for age, (uid, members) in enumerate(series.items()):
        files[uid] = unbounded.series_file(uid, members, BASE, "1.2.3")
        os.utime(files[uid], (long_ago + age, long_ago + age))  # first built, oldest
    total = sum(path.stat().st_size for path in files.values())
    cache = SeriesMetadataCache(tmp_path / "cache", max_bytes=total - 1)
    first, second, third, _ = series
    # A hit on the oldest makes it the newest: the second-oldest goes at the next trim.
    assert cache.series_file(first, series[first], BASE, "1.2.3") == files[first]
    assert cache.trim() == 1
    assert not files[second].exists()
    assert all(files[uid].exists() for uid in series if uid != second)
    # Within the bound again: nothing more goes.
    assert cache.trim() == 0

    # A bound below any one file: everything not used in the last minute goes, the
    # rest stays (a request may be about to read it).
    tight = SeriesMetadataCache(tmp_path / "cache", max_bytes=1)
    assert tight.trim() == 2  # the third and the fourth; the first was just used
    assert not files[third].exists()
    assert files[first].exists()
    os.utime(files[first], (long_ago, long_ago))
    assert tight.trim() == 1
    assert list((tmp_path / "cache").rglob("*.json.gz")) == []


def test_a_new_metadata_format_replaces_the_files_of_the_former_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by an earlier build (NaN in them, say) are never served again."""
    uid, members = next(iter(_series(tmp_path).items()))
    cache = SeriesMetadataCache(tmp_path / "cache", max_bytes=1 << 30)
    monkeypatch.setattr(series_metadata, "FORMAT", series_metadata.FORMAT - 1)
    former = cache.series_file(uid, members, BASE, "1.2.3")
    monkeypatch.undo()
    current = cache.series_file(uid, members, BASE, "1.2.3")
    assert current != former
    assert not former.exists()
    assert json.loads(gzip.decompress(current.read_bytes()))


def test_a_cache_file_left_empty_by_a_power_cut_is_built_again(tmp_path: Path) -> None:
    """An empty file under the right name (its rename durable, its contents not) was
    answered as it was: a gzip body the viewer cannot read, or a 500, for that series,
    until its next change."""
    uid, members = next(iter(_series(tmp_path).items()))
    cache = SeriesMetadataCache(tmp_path / "cache", max_bytes=1 << 30)
    built = cache.series_file(uid, members, BASE, "1.2.3")
    built.write_bytes(b"")
    pairs = [(sop, sha) for sop, sha, _, _ in members]
    assert cache.cached_file(uid, pairs, BASE) is None
    again = cache.series_file(uid, members, BASE, "1.2.3")
    assert again == built
    assert len(json.loads(gzip.decompress(again.read_bytes()))) == len(members)


def test_a_cache_file_is_whole_after_a_power_cut_that_kept_its_name(tmp_path: Path) -> None:
    """crashfs (tests/crashfs.py) keeps a file's contents only once they were synced, and
    its name once its folder was (here by a later write's sync). Without the sync of
    its contents before the rename, the name survives with an empty file."""
    uid, members = next(iter(_series(tmp_path).items()))
    (tmp_path / "backing").mkdir()
    with CrashFS(tmp_path / "backing", tmp_path / "mnt", tmp_path / "state") as fs:
        cache = SeriesMetadataCache(fs.mount / "cache", max_bytes=1 << 30)
        built = cache.series_file(uid, members, BASE, "1.2.3")
        for folder in (built.parent, built.parent.parent, fs.mount):
            descriptor = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fs.cut()
        fs.materialize(tmp_path / "durable")
    kept = tmp_path / "durable" / built.relative_to(fs.mount)
    assert len(json.loads(gzip.decompress(kept.read_bytes()))) == len(members)
