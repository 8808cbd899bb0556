"""How `pacs-edge serve` stops on SIGTERM as systemd sends it.

systemd stops a unit by signalling every process of its control group
(KillMode=control-group, the default), not only the main one; with several
workers the supervisor passes the signal on as well, so each worker gets it
twice, the second time often while it is already closing its index.

On SIGTERM every edge stops accepting at once (DIMSE, HL7, HTTPS) and what is
open drains within one grace period (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import hl7peer
import webpeer
from conftest import EdgeServer

from appliance.base.durable import TEMP_SUFFIX
from appliance.hl7.listener import STOP_GRACE
from appliance.services.startup_recovery import CLEAN_MARKER

STOP_DEADLINE = 45.0  # TimeoutStopSec of pacs-edge.service


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state not in ("Z", "X"):
                found.append(int(stat.parent.name))
    return found


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STOP_DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.05)


def test_workers_signalled_by_systemd_and_the_supervisor_stop_cleanly(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(start=False)
    server.configure(dicom={"workers": 2})
    server.start()
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGTERM)  # systemd: every process of the unit
    # The supervisor's forwarded SIGTERM, at every moment of a worker's stop, also after
    # its graceful part, while the index closes.
    deadline = time.monotonic() + STOP_DEADLINE
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, "serve still running after TimeoutStopSec"
        for child in _children(server.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        time.sleep(0.005)
    assert server.proc.returncode == 0
    assert (server.home / CLEAN_MARKER).exists(), "the stop was recorded as unclean"
    logged = len(server.log())
    server.start()
    assert "did not stop cleanly" not in server.log()[logged:]
    assert server.stop() == 0


def test_sigterm_refuses_new_associations_while_an_upload_drains(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port()))
    webpeer.add_user(server, "rad", "radiologist")
    [instance] = dicomgen.make_study(tmp_path / "one", seed=7, series_per_study=1,
                                     instances_per_series=1)
    head = webpeer.stow_first_part_head("rad", 100000000)
    with webpeer.tls_socket(server) as upload:
        # Past a read chunk, so the part is spooling; the rest is still on its way.
        upload.sendall(head + instance.path.read_bytes() + b"\0" * (3 << 20))
        _wait_for(lambda: bool(list((server.home / "store").rglob(f"*{TEMP_SUFFIX}"))))
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "stopping: no new associations" in server.log())
        late = dcmtk.echoscu(server.port)
        assert server.running, "the upload in flight should hold the stop"
    assert not late.ok, "an association was accepted after SIGTERM"
    assert server.stop() == 0


def test_sigterm_answers_the_hl7_message_in_hand_and_reads_no_more(
        free_port: Callable[[], int], edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port)
    server.start()
    accepted: list[str] = []

    def send_back_to_back() -> None:
        """As a RIS with a backlog: the next message as soon as the last is answered."""
        with hl7peer.raw(port) as ris:
            for n in range(100000):
                try:
                    ris.sendall(hl7peer.frame(hl7peer.orm(f"M{n}", accession=f"A{n}")))
                    ack = hl7peer.read_ack(ris)
                except (OSError, AssertionError):  # closed by the server
                    return
                if ack.code == "AA":
                    accepted.append(f"A{n}")

    ris = threading.Thread(target=send_back_to_back, daemon=True)
    ris.start()
    _wait_for(lambda: len(accepted) >= 20)
    assert server.proc is not None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(STOP_DEADLINE) == 0
    assert time.monotonic() - started < STOP_GRACE / 2, "the stop waited for the RIS"
    ris.join(STOP_DEADLINE)
    assert not ris.is_alive()
    orders = json.loads(server.cli("worklist", "list", "--json").stdout)
    assert set(accepted) <= {order["accession_number"] for order in orders}


def test_stop_with_a_connection_that_has_not_requested_an_association_is_quiet(
        edge_server: EdgeServer) -> None:
    """A connection without its A-ASSOCIATE-RQ yet (a port scan, a slow modality) has no
    association to abort when serve stops: it is closed, with no traceback."""
    with socket.create_connection((edge_server.host, edge_server.port)) as silent:
        assert edge_server.echo().ok  # accepted after `silent`: `silent` was accepted too
        assert edge_server.stop() == 0
        silent.settimeout(STOP_DEADLINE)
        assert silent.recv(1) == b"", "the connection was left open"
    log = edge_server.log()
    assert "Traceback" not in log and "Invalid event" not in log, log[-3000:]


def test_sigterm_lets_an_upload_in_flight_finish(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port()))
    webpeer.add_user(server, "rad", "radiologist")
    [instance] = dicomgen.make_study(tmp_path / "one", seed=8, series_per_study=1,
                                     instances_per_series=1, size=1024)  # 2 MiB
    body, content_type = webpeer.multipart_body([instance.path])
    head = webpeer.stow_head("rad", len(body), content_type)
    half = len(body) // 2 + (1 << 20)  # past a read chunk: the part is spooling
    with webpeer.tls_socket(server) as upload:
        upload.sendall(head + body[:half])
        _wait_for(lambda: bool(list((server.home / "store").rglob(f"*{TEMP_SUFFIX}"))))
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "stopping: no new associations" in server.log())
        upload.sendall(body[half:])
        upload.settimeout(5.0)  # well within the grace
        answer = upload.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert server.stop() == 0
    server.start()
    got = dcmtk.getscu(server.port, {"StudyInstanceUID": instance.study_uid},
                       tmp_path / "got").check()
    [received] = (tmp_path / "got").iterdir()
    assert dicomgen.dataset_bytes(received) == dicomgen.dataset_bytes(instance.path), got.output


def test_the_serve_lock_lives_as_long_as_any_process_of_the_serve(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """Workers whose supervisor was killed alone still serve the home: a new serve is
    refused until they are gone too, then (systemd's restart) it starts."""
    server = edge_server_factory(start=False)
    server.configure(dicom={"workers": 2})
    server.start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)  # the supervisor alone
    server.proc.wait(STOP_DEADLINE)
    refused = server.cli("serve", "--dicom-port", str(server.port), check=False, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"pacs-edge serve already runs on data home {server.home}" in refused.stderr
    server.kill()  # the rest of the unit's processes
    server.start()
    assert server.stop() == 0
