"""An IngestService that also audits: for ingest from files (`pacs-edge import`, drop folder).

Wrapping the service where it is composed (cli.py, serve.py) audits every
file-based ingest path without touching the importer or the drop-folder
processor: both call `ingest_file`, and C-STORE (`ingest_spool`) is audited
per association by the DIMSE handlers instead. Duplicates count too: the
data was received again, which is an access worth recording.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from appliance.audit.auditor import Auditor
from appliance.services.ingest import IngestResult, IngestService


class AuditedIngest(IngestService):
    def __init__(self, inner: IngestService, auditor: Auditor, source: str) -> None:
        super().__init__(inner.files, inner.index, max_inflated=inner.max_inflated)
        self.auditor = auditor
        self.source = source

    async def ingest_file(self, source: Path | BinaryIO, *, source_ae: str = "") -> IngestResult:
        result = await super().ingest_file(source, source_ae=source_ae)
        self.auditor.imported(self.source, result.header)
        return result
