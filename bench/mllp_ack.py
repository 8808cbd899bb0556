"""The reference server of the HL7 order figure (bench/workflow.py): python-hl7's asyncio
MLLP server answering each message with the AA python-hl7 builds (`Message.create_ack`),
one message at a time per connection, as pacs-edge does.

With `--durable DB` it first inserts one row per message into a SQLite table in WAL
mode with `synchronous=FULL` and commits it (one fsync of the WAL per message): the
floor of "AA only after a durable commit", with none of pacs-edge's own work (its
parsing into orders, idempotence look-up, audit). Without it nothing is kept: the
round trip and python-hl7's parsing alone.

Usage: python bench/mllp_ack.py [--durable DB]; it listens on 127.0.0.1 on a port
the OS picks and prints `mllp ack server ready port=N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

HOST = "127.0.0.1"


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE IF NOT EXISTS messages (control_id TEXT, body TEXT)")
    return db


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--durable", type=Path, help="commit each message to this SQLite file")
    args = parser.parse_args()
    db = open_db(args.durable) if args.durable else None

    async def serve(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                message = await reader.readmessage()
                if db is not None:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO messages VALUES (?, ?)",
                               (str(message.segment("MSH")(10)), str(message)))
                    db.execute("COMMIT")
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        writer.close()

    server = await start_hl7_server(serve, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    print(f"mllp ack server ready port={port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
