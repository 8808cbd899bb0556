"""The File Meta group ahead of a received dataset: the template's bytes are pydicom's."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom.dsutils import create_file_meta

from appliance.dimse.file_meta import encode_file_meta


def pydicoms(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """What pynetdicom writes without the template (preamble left out)."""
    out = BytesIO()
    write_file_meta_info(out, create_file_meta(sop_class_uid=sop_class,
                                               sop_instance_uid=sop_instance,
                                               transfer_syntax=syntax))
    return out.getvalue()


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian, JPEG2000Lossless])
@pytest.mark.parametrize("instance_length", [1, 2, 27, 28, 63, 64])
def test_the_template_writes_what_pydicom_writes(syntax: str, instance_length: int) -> None:
    instance = (generate_uid(prefix="1.2.") + "1" * 64)[:instance_length].rstrip(".") or "1"
    assert encode_file_meta(CTImageStorage, instance, syntax) == pydicoms(
        CTImageStorage, instance, syntax)


def test_the_template_reads_back_as_the_values_it_was_given() -> None:
    instance = generate_uid()
    head = b"\0" * 128 + b"DICM" + (encode_file_meta(CTImageStorage, instance,
                                                     ImplicitVRLittleEndian) or b"")
    meta = dcmread(BytesIO(head), force=True).file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID,
            meta.TransferSyntaxUID) == (CTImageStorage, instance, ImplicitVRLittleEndian)


@pytest.mark.parametrize("odd", ["", "1.2.3\\4.5", "1.2.\u00e93", None, "1" * 70000])
def test_values_the_template_does_not_take_go_pydicoms_way(odd: str | None) -> None:
    assert encode_file_meta(CTImageStorage, odd, ImplicitVRLittleEndian) is None
