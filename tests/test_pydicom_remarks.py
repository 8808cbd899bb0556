"""pydicom's remarks while many threads read: each thread hears its own, and the
process's warnings settings are never swapped (pydicom_remarks.py)."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dicomgen
import pydicom
import pytest

from appliance.base.errors import InvalidInstance
from appliance.services.dicom_header import read_header

WAIT = 30.0


def overlapping_reads(monkeypatch: pytest.MonkeyPatch, first: Path,
                      second: Path) -> list[str]:
    """read_header of `first` and of `second` in two threads, the second's read with
    pydicom begun after the first's and ended after it: how each went ("read" or the
    reason it was refused)."""
    dcmread = pydicom.dcmread
    first_in, second_in, first_done = threading.Event(), threading.Event(), threading.Event()

    def paced(path: Any, **kwargs: Any) -> Any:
        if str(path) == str(first):
            first_in.set()
            assert second_in.wait(WAIT)
            try:
                return dcmread(path, **kwargs)
            finally:
                first_done.set()
        assert first_in.wait(WAIT)
        second_in.set()
        assert first_done.wait(WAIT)
        return dcmread(path, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", paced)

    def outcome(path: Path) -> str:
        try:
            read_header(path)
        except InvalidInstance as exc:
            return exc.reason
        return "read"

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(outcome, (first, second)))


def truncated_cine(folder: Path) -> Path:
    """Its Pixel Data cut before the sequence delimiter: pydicom remarks "End of file"."""
    whole = dicomgen.make_fragmented_cine(folder / "cine").path
    cut = folder / "truncated-cine.dcm"
    cut.write_bytes(whole.read_bytes()[:-5000])
    return cut


def test_a_whole_instance_read_while_another_thread_reads_a_truncated_one_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both need pydicom (a name outside ASCII; a truncated sequence). With
    warnings.catch_warnings the truncated file's remark went to the list of the
    thread that entered last: the whole instance was refused as truncated."""
    whole = dicomgen.make_non_ascii_instance(tmp_path).path
    assert overlapping_reads(monkeypatch, truncated_cine(tmp_path), whole) == [
        "dataset is truncated", "read"]


def test_overlapping_reads_leave_the_process_warnings_settings_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """warnings.catch_warnings puts back on exit what it found on entry: the thread
    that left last put back the other's "always" filter and recording hook, for good."""
    before = (list(warnings.filters), warnings.showwarning)
    overlapping_reads(monkeypatch, truncated_cine(tmp_path),
                      dicomgen.make_non_ascii_instance(tmp_path).path)
    assert (list(warnings.filters), warnings.showwarning) == before
