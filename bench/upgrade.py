"""An upgrade of a box with a year of history: how long `pacs-edge serve` takes to
migrate its index when the new version starts, migration by migration, and whether it
keeps asking systemd for start-up time meanwhile (docs/benchmarks.md, "Upgrading a
box after a year").

Not part of `make bench` (the fill alone takes minutes):

    python bench/upgrade.py --from-version 19 --studies 100000 --per-study 10

builds, in a new data home under bench/out/work, an index at schema version
`--from-version` (the packaged migrations up to it) holding a year's rows: `--studies`
studies of 2 series and `--per-study` instances each, 90% evicted (every instance in a
verified pack), 5% replicated, 5% local; a patient per 1.6 studies with names as
modalities send them (accents composed and decomposed, PN padding, ideographic
groups), three tier transitions per evicted study, an order with two transitions and
three HL7 messages per study, one sync pass every 10 minutes. Then it starts the real
`pacs-edge serve` on it with $NOTIFY_SOCKET naming a datagram socket it listens on (as
systemd does for Type=notify), and reports each migration's time (from
schema_migrations.applied_at), start to READY=1, and the longest gap between two
requests for more start-up time (EXTEND_TIMEOUT_USEC) before READY=1.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import unicodedata
from contextlib import closing
from pathlib import Path

from common import WORK, console, pacs_edge

from appliance.services.startup_recovery import CLEAN_MARKER
from appliance.store import database

ROOT_UID = "1.2.826.0.1.3680043.10.4713.2025"
SURNAMES = ["Müller", "Doe", "Smith", "García", "Nguyen", "Øster", "Łukasz", "Dvořák",
            "Yamada", "O'Brien", "Schäfer", "Jönsson", "Ferreira", "Kowalski", "Lefèvre"]
GIVEN = ["Hans", "John", "María", "Anh", "Søren", "Zoë", "René", "Tarou", "Anna", "Chloé"]


def person_name(rng: random.Random) -> str:
    """A patient name as modalities and RIS send them."""
    name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
    kind = rng.random()
    if kind < 0.3:
        name = name.upper()
    elif kind < 0.4:
        name += "^^^"  # PN padding
    elif kind < 0.45:
        name += "=山田^太郎=やまだ^たろう"
    if rng.random() < 0.1:
        name = unicodedata.normalize("NFD", name)  # as macOS and some RIS write it
    return name


def build(path: Path, version: int, *, studies: int, per_study: int, seed: int = 1) -> None:
    """An index at schema `version` holding a year's rows (see the module docstring)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for name, func in database.SCHEMA_FUNCTIONS.items():
            conn.create_function(name, 1, func, deterministic=True)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_at REAL NOT NULL)")
        for number, name, sql in database.migration_scripts():
            if number <= version:
                conn.executescript(sql)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (number, name))
        rng = random.Random(seed)
        patients = max(1, studies * 5 // 8)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO patients (id, patient_id, patient_name, birth_date, sex)"
            " VALUES (?, ?, ?, ?, ?)",
            ((i, f"PID{i:08d}", person_name(rng), f"19{rng.randrange(30, 99)}0101",
              rng.choice("MF")) for i in range(1, patients + 1)))
        year = 365 * 86400.0
        conn.execute(
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {studies})"
            " INSERT INTO studies (id, patient_fk, study_uid, study_date, accession_number,"
            " study_description, referring_physician, series_count, instance_count,"
            " total_bytes, first_received_at, last_received_at, last_access_at, tier_state,"
            " tier_changed_at)"
            f" SELECT i, 1 + (i * 7919) % {patients}, '{ROOT_UID}.' || (1000000 + i),"
            " '2025' || printf('%04d', 101 + i % 1200), 'ACC' || i, 'CT CHEST', 'Ref^Doc',"
            f" 2, {per_study}, {per_study} * 530000, i * {year / studies},"
            f" i * {year / studies}, i * {year / studies},"
            " CASE WHEN i % 20 = 0 THEN 'local' WHEN i % 20 = 1 THEN 'replicated'"
            f" ELSE 'evicted' END, i * {year / studies} FROM c")
        conn.execute("INSERT INTO series (id, study_fk, series_uid, modality, series_number,"
                     " instance_count)"
                     " SELECT 2 * id - 1 + s, id, study_uid || '.' || (s + 1), 'CT', s + 1,"
                     f" {per_study // 2} + ({per_study} % 2) * (1 - s)"
                     " FROM studies, (SELECT 0 AS s UNION ALL SELECT 1)")
        conn.execute("INSERT INTO packs (id, study_fk, version, pack_name, manifest_name,"
                     " pack_size, pack_sha256, instance_count, state, access_tier, created_at,"
                     " verified_at)"
                     " SELECT id, id, 1, lower(hex(randomblob(16))), lower(hex(randomblob(16))),"
                     " total_bytes, lower(hex(randomblob(32))), instance_count, 'verified',"
                     " 'Cool', last_received_at + 3600, last_received_at + 3700"
                     " FROM studies WHERE tier_state <> 'local'")
        conn.execute(
            "WITH RECURSIVE k(m) AS (SELECT 1 UNION ALL SELECT m + 1 FROM k WHERE m <"
            f" {per_study})"
            " INSERT INTO instances (series_fk, sop_uid, sop_class_uid, instance_number,"
            " transfer_syntax, path, size, dataset_offset, sha256, received_at, source_ae,"
            " pack_fk, pack_offset, pack_length, is_local)"
            " SELECT se.id, se.series_uid || '.' || m || '.1700000000', "
            " '1.2.840.10008.5.1.4.1.1.2', m, '1.2.840.10008.1.2.1',"
            " st.study_uid || '/' || se.series_uid || '/' || se.series_uid || '.' || m"
            " || '.1700000000.' || lower(hex(randomblob(8))) || '.dcm',"
            " 530000, 1200, lower(hex(randomblob(32))), st.first_received_at, 'CT1',"
            " p.id, CASE WHEN p.id IS NULL THEN NULL ELSE m * 530000 END,"
            " CASE WHEN p.id IS NULL THEN NULL ELSE 530000 END,"
            " st.tier_state <> 'evicted'"
            " FROM k JOIN series se ON m <= se.instance_count JOIN studies st"
            " ON st.id = se.study_fk LEFT JOIN packs p ON p.study_fk = st.id")
        conn.execute("INSERT INTO tier_transitions (study_fk, from_state, to_state, trigger, at)"
                     " SELECT id, f, t, g, tier_changed_at FROM studies, (SELECT 'local' AS f,"
                     " 'replicating' AS t, 'replicate' AS g UNION ALL SELECT 'replicating',"
                     " 'replicated', 'verified' UNION ALL SELECT 'replicated', 'evicted',"
                     " 'evict') WHERE tier_state = 'evicted'")
        conn.execute("INSERT INTO orders (id, accession_number, study_uid, patient_id,"
                     " patient_name, status, status_changed_at, created_at, updated_at)"
                     " SELECT s.id, s.accession_number, s.study_uid, p.patient_id,"
                     " p.patient_name, 'COMPLETED', s.first_received_at, s.first_received_at,"
                     " s.first_received_at FROM studies s JOIN patients p"
                     " ON p.id = s.patient_fk")
        conn.execute("INSERT INTO order_transitions (order_fk, from_state, to_state, trigger,"
                     " source, at) SELECT id, f, t, 'x', 'hl7', created_at FROM orders,"
                     " (SELECT 'SCHEDULED' AS f, 'IN PROGRESS' AS t UNION ALL"
                     " SELECT 'IN PROGRESS', 'COMPLETED')")
        conn.execute("INSERT INTO hl7_messages (sending_application, sending_facility,"
                     " control_id, message_type, content_sha256, ack_code, received_at)"
                     " SELECT 'RIS', 'SITE', id || '-' || n, 'ORM^O01',"
                     " lower(hex(randomblob(32))), 'AA', created_at FROM orders,"
                     " (SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3)")
        passes = 365 * 24 * 6
        conn.execute(
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {passes})"
            " INSERT INTO sync_passes (started_at, finished_at, ok, summary)"
            " SELECT i * 600, i * 600 + 2, 1, '{\"replicated\": [], \"evicted\": 0}' FROM c")
        if version >= 17:
            conn.execute("INSERT INTO study_sop_classes SELECT se.study_fk, i.sop_class_uid,"
                         " COUNT(*) FROM instances i JOIN series se ON se.id = i.series_fk"
                         " GROUP BY 1, 2")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def serve_once(home: Path, notify_path: Path) -> tuple[float, float, list[tuple[float, str]], str]:
    """Start serve on `home` until READY=1, then SIGTERM: (the start's wall-clock time,
    seconds to READY=1, every notify message with its time since the start, serve's
    output)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(1.0)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
    env.pop("PACS_EDGE_HOME", None)
    log_path = home.parent / "serve.log"
    wall, started = time.time(), time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*pacs_edge(), "serve", "--home", str(home)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    messages: list[tuple[float, str]] = []
    try:
        while not any("READY=1" in m for _, m in messages):
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                messages.append((time.monotonic() - started, sock.recv(4096).decode()))
            except TimeoutError:
                continue
        ready = messages[-1][0]
    finally:
        proc.terminate()
        proc.wait(60)
        sock.close()
    return wall, ready, messages, log_path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-version", type=int, default=19)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--per-study", type=int, default=10)
    args = parser.parse_args()
    work = WORK / "upgrade"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    home = work / "home"
    subprocess.run([*pacs_edge(), "init", "--home", str(home), "--dicom-port", "0",
                    "--tls-port", "0", "--hl7-port", "0", "--http-port", "0",
                    "--metrics-port", "0"], check=True, capture_output=True)
    index = home / "index.sqlite3"
    for leftover in home.glob("index.sqlite3*"):
        leftover.unlink()
    begun = time.monotonic()
    build(index, args.from_version, studies=args.studies, per_study=args.per_study)
    with closing(sqlite3.connect(index)) as conn:
        counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("patients", "studies", "instances")}
    (home / CLEAN_MARKER).touch()  # the old version stopped cleanly for its upgrade
    console.print(f"built in {time.monotonic() - begun:.0f} s: {counts},"
                  f" {index.stat().st_size / 1e6:.0f} MB, schema {args.from_version}")
    load = os.getloadavg()
    wall, ready, messages, output = serve_once(home, work / "notify.sock")
    with closing(sqlite3.connect(index)) as conn:
        applied = conn.execute("SELECT version, name, applied_at FROM schema_migrations"
                               " WHERE applied_at > 0 ORDER BY version").fetchall()
    previous = wall  # the first one's time includes serve's own start (~1 s)
    for _version, name, at in applied:
        console.print(f"  {name:<40} {at - previous:7.2f} s")
        previous = at
    extends = [t for t, m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    gaps = [b - a for a, b in zip([0.0, *extends], extends, strict=False)]
    console.print(f"start to READY=1: {ready:.1f} s; requests for more time: {len(extends)},"
                  f" longest gap {max(gaps, default=0):.1f} s; load before"
                  f" {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    console.print("\n".join(line for line in output.splitlines() if "index" in line),
                  soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
