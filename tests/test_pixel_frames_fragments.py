"""Frames of encapsulated cines whose frames span several fragments and whose Basic
Offset Table is empty: byte for byte pydicom's frames, and each fragment read once
per file, not once per frame before it (reading a cine frame by frame, as a viewer
does, was quadratic: appliance/services/fragment_index.py).

Bytes read are the kernel's count for this process (/proc/self/io rchar): what the
product's own file reads cost, with nothing standing in for the file system.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import dicomgen
import pytest
from pydicom import dcmread, encaps

from appliance.services import pixel_frames
from appliance.services.fragment_index import FragmentIndex, FragmentIndexCache
from appliance.services.pixel_frames import FrameError, read_frames

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def pydicom_frames(path: Path) -> list[bytes]:
    ds = dcmread(path)
    return list(encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize(("frames", "fragments", "frame_bytes", "has_bot"), [
    (12, 3, 4000, False),  # several fragments a frame: boundaries are the EOI markers
    (6, 5, 25, False),  # fragments shorter than the 10 bytes the marker is looked for in
    (12, 1, 4000, False),  # one fragment a frame
    (1, 4, 4000, False),  # one frame in several fragments
    (12, 3, 4000, True),  # with a Basic Offset Table (pydicom's own path)
])
def test_split_fragment_frames_are_pydicoms_byte_for_byte(
        tmp_path: Path, frames: int, fragments: int, frame_bytes: int, has_bot: bool) -> None:
    cine = dicomgen.make_fragmented_cine(tmp_path, frames=frames, frame_bytes=frame_bytes,
                                         fragments_per_frame=fragments, has_bot=has_bot)
    expected = pydicom_frames(cine.path)
    assert len(expected) == frames
    for number in range(1, frames + 1):  # one request a frame, as a viewer reads
        got = read_frames(cine.path, JPEG_BASELINE, [number])
        assert got.encapsulated and got.frames == [expected[number - 1]], number
    backwards = list(range(frames, 0, -1))  # several at once, in any order
    assert read_frames(cine.path, JPEG_BASELINE, backwards).frames == expected[::-1]


def test_a_frame_past_a_cut_in_the_file_is_a_frame_error(tmp_path: Path) -> None:
    cine = dicomgen.make_fragmented_cine(tmp_path, frames=12)
    expected = pydicom_frames(cine.path)
    data = cine.path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) - len(expected[-1]) * 2])
    assert read_frames(cut, JPEG_BASELINE, [1]).frames == [expected[0]]
    with pytest.raises(FrameError):
        read_frames(cut, JPEG_BASELINE, [12])


def test_reading_a_cine_frame_by_frame_reads_each_fragment_once(tmp_path: Path) -> None:
    """Bytes read for every frame of a cine four times as long are about four times as
    many (linear), not sixteen (each frame rescanning the fragments before it); and the
    file's fragments are indexed once, however many frames are read."""

    def read_all(frames: int) -> int:
        cine = dicomgen.make_fragmented_cine(tmp_path / str(frames), frames=frames)
        before = bytes_read()
        for number in range(1, frames + 1):
            read_frames(cine.path, JPEG_BASELINE, [number])
        return bytes_read() - before

    short, long = read_all(40), read_all(160)
    assert long < 8 * short, (short, long)
    builds = pixel_frames.FRAGMENT_INDEXES.builds
    read_all(20)
    assert pixel_frames.FRAGMENT_INDEXES.builds == builds + 1


def test_the_index_cache_stays_within_its_bound_and_follows_a_replaced_file(
        tmp_path: Path) -> None:
    index = FragmentIndex(array("Q", [0] * 100), array("Q", [0] * 100), array("I", [0, 100]))
    cache = FragmentIndexCache(max_bytes=2 * index.nbytes)  # room for two
    files = [tmp_path / f"{n}.dcm" for n in range(3)]
    for path in files:
        path.write_bytes(b"stored")

    def use(path: Path) -> None:
        with path.open("rb") as fh:
            assert cache.get(fh, lambda: index) is index

    for path in (files[0], files[1], files[0]):
        use(path)
    assert cache.builds == 2  # the second read of a file is a hit
    use(files[2])  # a third: the least recently used (files[1]) goes
    use(files[0])
    assert cache.builds == 3
    use(files[1])
    assert cache.builds == 4
    replaced = tmp_path / "recalled.dcm"  # a recall writes a new file and renames it
    replaced.write_bytes(b"stored again")
    replaced.replace(files[1])
    use(files[1])
    assert cache.builds == 5
