"""The index and the store folder it describes share one random id: a lost index is
noticed, not served.

SQLite makes a new, empty index when the file is gone, and takes a file truncated to
0 bytes as a new database. A box run on such an index answers queries as if the
studies in its store and in its cloud did not exist, and accepts new instances
next to them. The id, kept in the index (table index_identity) and in
`<store>/.index-id`, tells a new index from a lost one when serve or a sync job
starts (`check_pairing`):

- neither has an id: a first start, or a box from before the id. Both get it,
  unless the index holds no instance and the store holds files: that index is
  a lost one, whatever its age;
- the store's id is not the index's (the index has another, or none): refused;
- only the index has an id (a store folder emptied or replaced): the store gets
  it; fsck reports what the index says the store should hold.

A refusal is IndexUnavailable, naming the rebuild (docs/operator-guide.md, "A
lost or damaged index"): `restore`, then `fsck --repair`, which adopts the files
the cloud does not have and then `pair`s the index with the store. So the box
does not start half rebuilt: restored, with its never replicated files unknown.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path

from appliance.base.durable import atomic_write
from appliance.base.errors import IndexUnavailable
from appliance.store import database
from appliance.store.files import FileStore
from appliance.store.index import Index

MARKER = ".index-id"
_REBUILD = ("stop serve and sync; `pacs-edge restore`, then `pacs-edge fsck --repair`,"
            " rebuild the index from the cloud and the store (docs/operator-guide.md,"
            " \"A lost or damaged index\")")


async def check_pairing(index: Index, files: FileStore) -> None:
    """Refuse an index that is not the one of this store (IndexUnavailable); pair a new
    box's index and store."""
    index_id = await database.run_sync(index.reader, _index_id)
    store_id = _store_id(files.root)
    unpaired = _unpaired(index, files.root, index_id, store_id)
    if unpaired:
        raise IndexUnavailable(unpaired, hint=_REBUILD)
    if (index_id is None and store_id is None
            and not await database.run_sync(index.reader, _holds_instances)
            and await asyncio.to_thread(_has_any, files)):
        raise IndexUnavailable(
            f"the index {index.path} holds no instance, but the store {files.root}"
            " holds files", hint=_REBUILD)
    if index_id is None or store_id is None:
        await pair(index, files)


async def pairing_problem(index: Index, store_root: Path) -> str:
    """Why serve and sync would refuse this index as not the store's ('' when they would
    not), for `pacs-edge status` to say without refusing: a read-only command run on a
    home whose index was lost makes a new, empty one, and must not then report an
    empty box as if all were well."""
    index_id = await database.run_sync(index.reader, _index_id)
    unpaired = _unpaired(index, store_root, index_id, _store_id(store_root))
    return f"{unpaired}; rebuild it: {_REBUILD}" if unpaired else ""


def _unpaired(index: Index, store_root: Path, index_id: str | None,
              store_id: str | None) -> str:
    if store_id is None or store_id == index_id:
        return ""
    what = "is new" if index_id is None else "is another store's"
    return (f"the index {index.path} {what}: the store {store_root} belongs to an index"
            " that is gone (deleted, emptied or replaced)")


async def pair(index: Index, files: FileStore) -> None:
    """Give the index an id if it has none, and write it into the store's marker: the
    index, rebuilt or new, is the one of this store from now on."""
    assert index.writer is not None
    fresh = secrets.token_hex(16)
    index_id = await index.writer.submit_sync(lambda conn: _take_id(conn, fresh))
    atomic_write(files.root / MARKER, index_id.encode("ascii"))


def _index_id(conn: sqlite3.Connection) -> str | None:
    row = database.query_one(conn, "SELECT id FROM index_identity")
    return None if row is None else str(row[0])


def _take_id(conn: sqlite3.Connection, fresh: str) -> str:
    """The index's id, `fresh` if it had none (concurrent starters agree on one)."""
    conn.execute("INSERT OR IGNORE INTO index_identity (only_row, id) VALUES (1, ?)", (fresh,))
    return str(database.query_one(conn, "SELECT id FROM index_identity")[0])


def _holds_instances(conn: sqlite3.Connection) -> bool:
    return database.query_one(conn, "SELECT 1 FROM instances LIMIT 1") is not None


def _store_id(root: Path) -> str | None:
    try:
        return (root / MARKER).read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexUnavailable(f"the store's index id {root / MARKER} cannot be read: {exc}",
                               hint="it holds the 32 hex digits of index_identity.id") from exc


def _has_any(files: FileStore) -> bool:
    """Whether the store holds an instance file (the walk stops at the first)."""
    return next(iter(files.iter_files()), None) is not None
