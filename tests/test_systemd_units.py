"""The systemd units in systemd/: they verify cleanly, and their sandboxing exposure is low.

`systemd-analyze verify` and `systemd-analyze security --offline=true` run on
the units installed into a throw-away root (`--root`): the units under
etc/systemd/system, a copy of the host's own units (sysinit.target and the
rest that every service depends on) under usr/lib/systemd/system, and a stub
executable where ExecStart expects the venv. No systemd needs to be running.
The exposure figures are recorded in docs/security.md.

The privilege split (docs/security.md): serve's unit leaves it only the
secrets it reads, shown by running a real serve in the unit's file-system view
(tests/unitsandbox.py) with dcmtk peers; the sync agent's unit hides the CA
and node keys; and no pacs-edge process can be inspected by another process of
its own user (/proc/PID/root would reach into the sync agent's view).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import unitsandbox
from conftest import (
    NO_CAPABILITIES,
    EdgeServer,
    init_home,
    pacs_edge_command,
    run_pacs_edge,
)
from cryptography import x509

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("pacs-edge.service", "pacs-edge-sync.service")
PORT_DROP_IN = "pacs-edge.service.d"
HOST_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 3.0
_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")


def _analyze_usable() -> str | None:
    """Why the tool cannot run here, or None."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (scripts/setup-test-deps.sh installs systemd)"
    if not (HOST_UNITS / "sysinit.target").exists():
        return f"no systemd unit library at {HOST_UNITS}"
    return None


pytestmark = pytest.mark.skipif(_analyze_usable() is not None,
                                reason=_analyze_usable() or "")


def _root(tmp_path: Path, *, port_104: bool) -> Path:
    root = tmp_path / ("root-104" if port_104 else "root")
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD_DIR / unit, units / unit)
    if port_104:
        shutil.copytree(SYSTEMD_DIR / PORT_DROP_IN, units / PORT_DROP_IN)
    # Stubs where ExecStart= and ExecReload= expect their programs.
    for executable in (root / "opt/pacs-edge/venv/bin/pacs-edge", root / "bin/kill"):
        executable.parent.mkdir(parents=True)
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    return root


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("port_104", [False, True], ids=["default", "port-104-drop-in"])
def test_units_verify_without_any_warning(tmp_path: Path, port_104: bool) -> None:
    proc = _analyze("verify", f"--root={_root(tmp_path, port_104=port_104)}", *UNITS)
    # verify exits 0 on unknown keys too (it only warns), so any output fails.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr)


@pytest.mark.parametrize("port_104", [False, True], ids=["default", "port-104-drop-in"])
def test_units_exposure_is_ok(tmp_path: Path, port_104: bool) -> None:
    root = _root(tmp_path, port_104=port_104)
    figures = {}
    for unit in UNITS:
        proc = _analyze("security", "--offline=true", f"--root={root}", unit)
        match = _EXPOSURE.search(proc.stdout)
        assert match, proc.stdout + proc.stderr
        figures[match[1]] = float(match[2])
    assert all(score <= MAX_EXPOSURE for score in figures.values()), figures


def test_units_are_notify_services_with_watchdog_and_a_dedicated_user() -> None:
    for unit in UNITS:
        directives = _directives(SYSTEMD_DIR / unit)
        assert directives["Type"] == ["notify"]
        assert directives["NotifyAccess"] == ["main"]
        assert directives["WatchdogSec"] and directives["Restart"] == ["on-failure"]
        assert directives["User"] == ["pacs-edge"] and directives["Group"] == ["pacs-edge"]
        assert directives["StateDirectory"] == ["pacs-edge"]
        assert directives["ConfigurationDirectory"] == ["pacs-edge"]
        # No capability unless the port-104 drop-in grants one.
        assert directives["CapabilityBoundingSet"] == [""]
        assert directives["AmbientCapabilities"] == [""]
    drop_in = _directives(SYSTEMD_DIR / PORT_DROP_IN / "privileged-port.conf")
    assert drop_in["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert drop_in["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


def test_service_directives_are_sorted_within_each_group() -> None:
    for unit in UNITS:
        for group in _groups(SYSTEMD_DIR / unit):
            assert group == sorted(group), f"{unit}: {group}"


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def _groups(path: Path) -> list[list[str]]:
    """[Service] directive names per blank-line separated block (comments ignored).

    [Unit] keeps systemd's own order (Description first)."""
    groups: list[list[str]] = [[]]
    section = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif not line.strip():
            groups.append([])
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            groups[-1].append(line.split("=", 1)[0])
    return [g for g in groups if g]


# --- privilege split ------------------------------------------------------------------

SERVE_READS = ("link.key", "log.key", "node.key")  # the secrets `pacs-edge serve` needs
UNIT_HOME, UNIT_CONFIG = "/var/lib/pacs-edge", "/etc/pacs-edge"
_READY = re.compile(r"ready to accept associations .* port=(\d+) tls_port=(\d+)")


def _secrets_home(base: Path) -> tuple[Path, Path, list[Path]]:
    """An initialised home with every kind of secret, and the role's credentials file."""
    home = init_home(base / "home")
    (home / "secrets/audit.key").write_bytes(secrets.token_bytes(32))
    (home / "secrets/audit.key").chmod(0o600)
    config = base / "etc"
    config.mkdir()
    (config / "cloud-credentials").write_text("DefaultEndpointsProtocol=https;AccountKey=x\n")
    (config / "cloud-credentials").chmod(0o600)
    probes = [*sorted((home / "secrets").iterdir()), config / "cloud-credentials"]
    return home, config, probes


def test_serve_unit_sees_only_the_secrets_it_reads_and_still_serves(
    tmp_path: Path, free_port: Callable[[], int],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    home, config, probes = _secrets_home(tmp_path)
    tls_port = free_port()
    EdgeServer(home).configure(dicom={"tls_port": tls_port})
    run_pacs_edge("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"),
                  "--home", str(home))
    report, log_path = tmp_path / "report", tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = unitsandbox.start(
            SYSTEMD_DIR / "pacs-edge.service", [*pacs_edge_command(), "serve", "--home",
                                                str(home)],
            user="root", group="root", probes=probes, report=report, stage=tmp_path / "stage",
            path_map={UNIT_HOME: str(home), UNIT_CONFIG: str(config)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (ready := _READY.search(log_path.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        # Even root, in serve's view, finds no other secret (they are not there).
        seen = unitsandbox.read_report(report)
        assert seen == {**{str(p): "missing" for p in probes},
                        **{str(home / "secrets" / name): "readable" for name in SERVE_READS},
                        str(config / "cloud-credentials"): "unreadable"}, seen
        plain = int(ready[1])
        tls = ["+tls", str(tmp_path / "testscu/testscu.key"),
               str(tmp_path / "testscu/testscu.pem"), "+cf", str(tmp_path / "testscu/ca.pem"),
               "--profile-bcp195-nd"]
        dcmtk.echoscu(tls_port, args=tls).check()
        dcmtk.storescu(tls_port, [i.path for i in small_study], args=tls).check()
        found = dcmtk.findscu(plain, {"StudyInstanceUID": small_study[0].study_uid}).check()
        assert found.values("StudyInstanceUID") == [small_study[0].study_uid]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()


def _presented_serial(port: int, client: Path) -> int:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(client / "ca.pem")
    context.load_cert_chain(client / "testscu.pem", client / "testscu.key")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_serve_unit_reloads_a_renewed_certificate_but_not_a_new_key(
        tmp_path: Path, free_port: Callable[[], int]) -> None:
    """In the unit's view (/proc mounted subset=pid, hidepid=invisible; secrets/node.key a
    bind of the file as it was at the start), SIGHUP loads a renewed certificate. A new
    key (`certs renew --new-key`) is a new file serve cannot see: the reload refuses the
    pair and says to restart, and the old certificate is still presented."""
    home, config, probes = _secrets_home(tmp_path)
    tls_port = free_port()
    EdgeServer(home).configure(dicom={"tls_port": tls_port})
    client = tmp_path / "testscu"
    run_pacs_edge("certs", "issue", "testscu", "--out", str(client), "--home", str(home))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = unitsandbox.start(
            SYSTEMD_DIR / "pacs-edge.service", [*pacs_edge_command(), "serve", "--home",
                                                str(home)],
            user="root", group="root", probes=probes, report=tmp_path / "report",
            stage=tmp_path / "stage", path_map={UNIT_HOME: str(home), UNIT_CONFIG: str(config)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def logged(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

    node = home / "tls" / "node.pem"
    try:
        logged("ready to accept associations")
        run_pacs_edge("certs", "renew", "--home", str(home))
        proc.send_signal(signal.SIGHUP)
        logged("node certificate reloaded serial=")
        renewed = x509.load_pem_x509_certificate(node.read_bytes()).serial_number
        assert _presented_serial(tls_port, client) == renewed
        run_pacs_edge("certs", "renew", "--new-key", "--home", str(home))
        proc.send_signal(signal.SIGHUP)
        logged("node certificate reload refused reason=the key does not match the"
               " certificate: the certificate loaded before is still presented; after"
               " `pacs-edge certs renew --new-key`, restart pacs-edge instead")
        assert _presented_serial(tls_port, client) == renewed
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()


def test_sync_unit_cannot_read_the_ca_and_node_keys(tmp_path: Path) -> None:
    home, config, probes = _secrets_home(tmp_path)
    report = tmp_path / "report"
    proc = unitsandbox.start(
        SYSTEMD_DIR / "pacs-edge-sync.service", ["true"], user="root", group="root",
        probes=probes, report=report, stage=tmp_path / "stage",
        path_map={UNIT_HOME: str(home), UNIT_CONFIG: str(config)})
    assert proc.wait(60) == 0
    seen = unitsandbox.read_report(report)
    hidden = {str(home / "secrets" / name) for name in ("ca.key", "node.key")}
    assert {path for path, state in seen.items() if state != "readable"} == hidden, seen


def test_a_pacs_edge_process_cannot_be_inspected_by_its_own_user(tmp_path: Path) -> None:
    """Through /proc/PID/root a process of the same user would open files in the sync
    agent's view (the site key), through /proc/PID/environ or mem read its memory.
    Both processes run as this user without capabilities, as the units run them
    (CapabilityBoundingSet= empty): then only the dumpable flag decides."""
    home = init_home(tmp_path / "home")
    log_path = tmp_path / "sync.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([*NO_CAPABILITIES, *pacs_edge_command(), "sync", "--home",
                                  str(home)], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "sync agent ready" not in log_path.read_text(errors="replace"):
            assert agent.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for target in (f"/proc/{agent.pid}/root{home}/secrets/site.key",
                       f"/proc/{agent.pid}/environ"):
            peek = subprocess.run([*NO_CAPABILITIES, sys.executable, "-c",
                                   f"open({target!r}, 'rb').read()"],
                                  capture_output=True, text=True)
            assert peek.returncode != 0 and "PermissionError" in peek.stderr, (target, peek)
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(60)
