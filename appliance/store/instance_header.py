"""InstanceHeader: what the index records about one instance, as one typed value.

It lives on the store floor because the index and the file store take it;
appliance.services.dicom_header builds it from a Part 10 file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceHeader:
    """What the index records about one instance (PHI: never log these values)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    character_set: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
