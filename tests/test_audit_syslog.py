"""Syslog forwarding (appliance/audit/syslog.py) against a real TLS collector.

The collector is test_audit's: stdlib ssl + socketserver on 127.0.0.1, RFC 5425
octet counting, certificates made with cryptography. The forwarder runs in this
process on an audit log the test writes (and, to show a damaged line, edits), so
each test sets up exactly the log state it is about.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_audit import TlsSyslogCollector, _certificates, _suppress

from appliance.audit.auditor import Auditor
from appliance.audit.log import AuditLog
from appliance.audit.records import (
    Action,
    AuditRecord,
    AuditSource,
    EventID,
    Outcome,
    Participant,
)
from appliance.audit.syslog import BOM, SyslogForwarder, SyslogTarget, read_cursor

DEADLINE = 30.0


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[TlsSyslogCollector, Path]]:
    ca, cert, key = _certificates(tmp_path)
    running = TlsSyslogCollector(cert, key).start()
    yield running, ca
    with _suppress():
        running.stop()


@pytest.fixture
def forwarders() -> Iterator[list[SyslogForwarder]]:
    started: list[SyslogForwarder] = []
    yield started
    for forwarder in started:
        forwarder.stop()


def _record(user: str = "WS") -> dict[str, object]:
    return AuditRecord(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS,
                       (Participant(user, requestor=True),), AuditSource("EDGE")).to_dict()


def _forward(audit_log: AuditLog, collector: TlsSyslogCollector, ca: Path,
             started: list[SyslogForwarder]) -> SyslogForwarder:
    forwarder = SyslogForwarder(audit_log, SyslogTarget("127.0.0.1", collector.port, ca),
                                retry_seconds=0.1, poll_seconds=0.1)
    started.append(forwarder)
    forwarder.start()
    return forwarder


def _wait(condition: Callable[[], object], what: object) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_damaged_record_stops_forwarding_in_front_of_it_with_an_error(
    tmp_path: Path, collector: tuple[TlsSyslogCollector, Path],
    forwarders: list[SyslogForwarder], caplog: pytest.LogCaptureFixture,
) -> None:
    syslog, ca = collector
    audit_log = AuditLog(tmp_path / "audit" / "audit.log")
    audit_log.append([_record() for _ in range(6)])
    lines = audit_log.path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"seq":5', b'"seq":"5"')  # record 5 damaged
    audit_log.path.write_bytes(b"".join(lines))

    caplog.set_level(logging.INFO, logger="appliance.audit.syslog")
    _forward(audit_log, syslog, ca, forwarders)
    _wait(lambda: "has a damaged record" in caplog.text, "no damaged-record error")
    _wait(lambda: syslog.seqs() == [1, 2, 3, 4], syslog.seqs())  # those before it go out
    assert read_cursor(audit_log) == (4, sum(len(line) for line in lines[:4]))
    time.sleep(0.5)  # retries at 0.1 s: each must see the damage, not a lost cursor
    assert "cursor does not match the log" not in caplog.text
    assert syslog.seqs() == [1, 2, 3, 4]


def test_a_cursor_that_lost_its_place_finds_its_record_again(
    tmp_path: Path, collector: tuple[TlsSyslogCollector, Path],
    forwarders: list[SyslogForwarder],
) -> None:
    syslog, ca = collector
    audit_log = AuditLog(tmp_path / "audit" / "audit.log")
    audit_log.append([_record() for _ in range(5)])
    cursor = audit_log.path.parent / "syslog.cursor"
    cursor.write_text(json.dumps({"seq": 3, "offset": 7}), encoding="utf-8")  # mid-line
    _forward(audit_log, syslog, ca, forwarders)
    _wait(lambda: syslog.seqs() == [4, 5], syslog.seqs())


def test_a_login_name_with_control_characters_arrives_as_well_formed_xml(
    tmp_path: Path, collector: tuple[TlsSyslogCollector, Path],
    forwarders: list[SyslogForwarder],
) -> None:
    syslog, ca = collector
    audit_log = AuditLog(tmp_path / "audit" / "audit.log")
    auditor = Auditor(audit_log, ae_title="EDGE", process="serve")
    typed = "mallory\x01\x1b[2J\x00"  # as a login form or an HTTP Basic header sends it
    auditor.user_authentication(typed, "192.0.2.7", failure="unknown user or wrong password",
                                via="form")
    auditor.close()
    assert json.loads(audit_log.path.read_text())["record"]["ActiveParticipant"][0][
        "UserID"] == typed  # the log keeps what was typed
    _forward(audit_log, syslog, ca, forwarders)
    _wait(lambda: syslog.seqs() == [1], syslog.seqs())
    message = ET.fromstring(syslog.messages[0].split(BOM, 1)[1])  # raises if not XML
    user = message.find("ActiveParticipant")
    assert user is not None and user.get("UserID") == "mallory\ufffd\ufffd[2J\ufffd"


def test_stop_ends_the_tls_connection_with_close_notify(
    tmp_path: Path, forwarders: list[SyslogForwarder],
) -> None:
    """RFC 5425 4.4: a sender closing a connection MUST send close_notify first. The
    collector here tells a close_notify (recv answers b"") from a bare TCP close
    (SSLEOFError, since ragged EOFs are not suppressed)."""
    ca, cert, key = _certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    ended: list[str] = []

    def serve_one() -> None:
        raw, _ = listener.accept()
        raw.settimeout(DEADLINE)
        with context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            try:
                while conn.recv(65536):
                    pass
                ended.append("close_notify")
            except ssl.SSLEOFError:
                ended.append("no close_notify")
            except OSError as exc:
                ended.append(type(exc).__name__)

    reader = threading.Thread(target=serve_one, daemon=True)
    reader.start()
    try:
        audit_log = AuditLog(tmp_path / "audit" / "audit.log")
        audit_log.append([_record()])
        forwarder = SyslogForwarder(audit_log, SyslogTarget("127.0.0.1",
                                                            listener.getsockname()[1], ca),
                                    retry_seconds=0.1, poll_seconds=0.1)
        forwarders.append(forwarder)
        forwarder.start()
        _wait(lambda: read_cursor(audit_log)[0] == 1, "record 1 not sent")
        forwarder.stop()
        reader.join(DEADLINE)
    finally:
        listener.close()
    assert ended == ["close_notify"]
