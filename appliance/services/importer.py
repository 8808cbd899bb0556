"""`pacs-edge import`: ingest files and folders through the same durable path as C-STORE."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.base.errors import PacsEdgeError, RejectedInstance
from appliance.services.ingest import IngestService
from appliance.store.index import RecordOutcome


@dataclass
class ImportSummary:
    stored: int = 0
    duplicates: int = 0
    new_versions: int = 0
    bytes: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file under named folders (sorted, recursive)."""
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name
        else:
            yield path


async def import_files(
    ingest: IngestService,
    files: list[Path],
    *,
    on_progress: Callable[[Path], None] = lambda _path: None,
) -> ImportSummary:
    summary = ImportSummary()
    for path in files:
        try:
            result = await ingest.ingest_file(path, source_ae="import")
        except RejectedInstance as exc:
            summary.rejected.append((path, exc.reason))
        except FileNotFoundError:
            summary.rejected.append((path, "file not found"))
        except PermissionError:
            summary.rejected.append((path, "permission denied"))
        except IsADirectoryError:
            summary.rejected.append((path, "is a directory"))
        except PacsEdgeError as exc:
            summary.rejected.append((path, exc.message))
        else:
            if result.outcome is RecordOutcome.DUPLICATE:
                summary.duplicates += 1
            else:
                summary.stored += 1
                summary.bytes += path.stat().st_size
                if result.outcome is RecordOutcome.NEW_VERSION:
                    summary.new_versions += 1
        on_progress(path)
    return summary
