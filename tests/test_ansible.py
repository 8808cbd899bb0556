"""The Ansible role `pacs_edge`, converged for real with ansible-playbook on two local "hosts".

Both hosts are this machine (connection local), each installed under its own
root prefix with its own AE title and port, from a wheel and a wheelhouse the
fixture builds (`pip wheel`), through the example playbook ansible/playbook.yml.
The role creates a real system user (removed at the end), so the module runs
as root only. Services are not started by the role here (no systemd as PID 1,
and a prefixed install never starts them): the test starts each host's
`pacs-edge serve` from the deployed venv as the service user and sends C-ECHO.

Converging again must change nothing; changing one host's variable must
change that host only.

edge-b runs DICOM TLS only (pacs_edge_dicom_plain_enabled false); peers left
to the role's defaults get least privilege (store only, AE title bound to the
host). Each serve runs in the file-system view of its deployed unit
(tests/unitsandbox.py): it sees only the secrets it reads.

The web: each host gets its own HTTPS port and the OHIF viewer build that
scripts/install-ohif.sh installed here (the controller), packed and copied by
the role into a versioned folder and switched to through the link `viewer/current`
that `[http] viewer_root` names; serve answers /login over TLS on that port and
serves the viewer's files from that folder. Another build goes live through the
link's swap, polled during the run: never a moment without the viewer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dcmtk
import pytest
import unitsandbox
import yaml

from appliance.base.config import load_config

# Builds a wheelhouse and installs two venvs: minutes, not seconds. The module must stay on
# one worker (`make test` distributes whole modules, --dist loadfile): the fleet is built
# once, and fleets built side by side fight over the one service user (USER) and the
# in-tree `pip wheel` build of ROOT.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
# Per run: two runs at once (other worktrees) must not delete each other's user.
USER = f"pacsedge-t{os.getpid()}"
HOST_PYTHON = Path("/usr/bin/python3")
HOSTS = ("edge-a", "edge-b")
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                    re.MULTILINE)
KEY_FILES = ("link.key", "site.key", "names.key", "log.key", "ca.key", "node.key")
SERVE_READS = ("link.key", "log.key", "node.key")
TLS_ONLY_HOST = "edge-b"
VIEWER_BUILD = ROOT / ".cache" / "ohif" / "3.13.2"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the role creates a system user: run as root"
    if not (BIN / "ansible-playbook").exists():
        return "ansible-core is not installed (pip install -e '.[test]')"
    if not HOST_PYTHON.exists():
        return f"needs {HOST_PYTHON} (with python3-venv) on the host"
    return None


if _why_not():
    pytestmark.append(pytest.mark.skip(reason=_why_not() or ""))


def _play(inventory: Path, base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """ansible-playbook with the example playbook, its state kept under `base`."""
    env = {**os.environ, "ANSIBLE_HOME": str(base / ".ansible"),
           "ANSIBLE_LOCAL_TEMP": str(base / ".ansible/tmp"),
           "ANSIBLE_PIPELINING": "1", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_RETRY_FILES_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("PACS_EDGE_HOME", None)
    # One host at a time: both are this machine and share its user database.
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "--forks", "1", *args,
         str(ANSIBLE_DIR / "playbook.yml")],
        capture_output=True, text=True, timeout=900, env=env, cwd=ANSIBLE_DIR,
        stdin=subprocess.DEVNULL)


def build_wheels(python: Path, out: Path, *args: str) -> None:
    """`pip wheel` as docs/deployment.md builds the wheelhouse: the requirements in `args`
    (with pip options) and their dependencies as wheels in `out`. --use-pep517 builds a
    dependency shipped only as an sdist with a setup.py (sdnotify) in an isolated
    environment: without it, the pip of Debian 12 (23.0.1) calls `setup.py bdist_wheel`,
    which needs the `wheel` package that a venv does not have ("invalid command
    'bdist_wheel'")."""
    proc = subprocess.run([str(python), "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                           "--use-pep517", "-w", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@dataclass
class Fleet:
    base: Path
    inventory: Path
    hosts: dict[str, dict[str, object]]

    def prefix(self, host: str) -> Path:
        return self.base / host

    def home(self, host: str) -> Path:
        return self.prefix(host) / "var/lib/pacs-edge"

    def venv(self, host: str) -> Path:
        return self.prefix(host) / "opt/pacs-edge/venv"

    def viewers(self, host: str) -> Path:
        return self.prefix(host) / "opt/pacs-edge/viewer"

    @property
    def file_sd(self) -> Path:
        return self.base / "prometheus" / "pacs-edge.json"

    def write_inventory(self, wheel: Path, wheelhouse: Path) -> None:
        doc = {"pacs_edge": {
            "vars": {
                "ansible_connection": "local",
                # The host's own Python: the service user cannot reach this venv's.
                "ansible_python_interpreter": str(HOST_PYTHON),
                "ansible_become_method": "ansible.builtin.su",
                "ansible_become_flags": "-s /bin/sh",  # the service user has no login shell
                "pacs_edge_wheel": str(wheel),
                "pacs_edge_wheelhouse": str(wheelhouse),
                "pacs_edge_user": USER,
                "pacs_edge_group": USER,
                "pacs_edge_python": str(HOST_PYTHON),
                "pacs_edge_dicom_host": "127.0.0.1",
                "pacs_edge_http_host": "127.0.0.1",
                "pacs_edge_viewer_build": str(VIEWER_BUILD),
                # The packed viewer stays in the run's folder, not in the shared .cache.
                "pacs_edge_viewer_archive_dir": str(self.base),
                "pacs_edge_sync_evict_after_days": 14,
                # Register both boxes with a Prometheus on the controller (file_sd).
                "pacs_edge_prometheus_file_sd": str(self.file_sd),
                "pacs_edge_metrics_allow": ["127.0.0.1/32", "10.0.0.0/8"],
                "pacs_edge_peers": [
                    {"name": "testscu", "ae_title": dcmtk.TEST_AE, "host": "127.0.0.1",
                     "port": 1, "allow": ["store", "find"]},
                    {"name": "ct1", "ae_title": "CT1", "host": "127.0.0.1", "port": 104},
                    {"name": "ws1", "ae_title": "WS1", "host": "127.0.0.1", "port": 104,
                     "allow": ["find", "move"], "bind_host": False, "tls": True,
                     "tls_only": True},
                    {"name": "ris", "ae_title": "RIS", "host": "127.0.0.1", "allow": ["hl7"]},
                ],
            },
            "hosts": self.hosts,
        }}
        self.inventory.write_text(yaml.safe_dump(doc, sort_keys=False))

    def converge(self) -> dict[str, tuple[int, int]]:
        """Run the example playbook; {host: (changed, failed)} from the recap."""
        proc = _play(self.inventory, self.base)
        recap = {m[1]: (int(m[3]), int(m[5]) + int(m[4])) for m in _RECAP.finditer(proc.stdout)}
        assert proc.returncode == 0 and set(recap) == set(self.hosts), (
            proc.stdout[-8000:] + proc.stderr[-4000:])
        return {host: recap[host] for host in self.hosts}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    base = Path(tempfile.mkdtemp(prefix="pacs-edge-ansible-", dir="/tmp"))
    base.chmod(0o755)  # the service user must reach its prefix
    try:
        wheelhouse = base / "wheelhouse"
        build_wheels(Path(sys.executable), wheelhouse, str(ROOT))
        wheel = next(wheelhouse.glob("pacs_edge-*.whl"))
        # The controller's viewer build (a no-op when installed, as it is after set-up).
        subprocess.run([str(ROOT / "scripts" / "install-ohif.sh")], check=True, timeout=600)
        hosts: dict[str, dict[str, object]] = {
            host: {"pacs_edge_root_prefix": str(base / host),
                   "pacs_edge_ae_title": host.upper().replace("-", "_"),
                   "pacs_edge_dicom_port": dcmtk.free_port(),
                   "pacs_edge_dicom_tls_port": dcmtk.free_port(),
                   "pacs_edge_hl7_port": dcmtk.free_port(),
                   "pacs_edge_http_port": dcmtk.free_port()}
            for host in HOSTS}
        hosts[TLS_ONLY_HOST]["pacs_edge_dicom_plain_enabled"] = False
        hosts[TLS_ONLY_HOST]["pacs_edge_http_max_request_mb"] = 64
        hosts[TLS_ONLY_HOST]["pacs_edge_auth_max_failed_logins"] = 3
        hosts[TLS_ONLY_HOST]["pacs_edge_hl7_tls"] = True
        fleet = Fleet(base, base / "inventory.yml", hosts)
        fleet.write_inventory(wheel, wheelhouse)
        fleet.first_recap = fleet.converge()  # type: ignore[attr-defined]
        yield fleet
    finally:
        subprocess.run(["userdel", USER], capture_output=True, check=False)
        subprocess.run(["groupdel", USER], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_wheelhouse_builds_with_the_pip_of_a_debian_venv(tmp_path: Path) -> None:
    """The wheelhouse command works with Debian's own pip in a fresh venv (what `make test`
    has on a fresh Debian 12), not only with a newer pip: sdnotify is an sdist. No cache:
    a wheel pip built for an earlier install would hide the build."""
    venv = tmp_path / "venv"
    subprocess.run([str(HOST_PYTHON), "-m", "venv", str(venv)], check=True, timeout=300,
                   capture_output=True)
    sdnotify = next(line.strip().strip('",') for line in (ROOT / "pyproject.toml")
                    .read_text().splitlines() if line.strip().startswith('"sdnotify=='))
    build_wheels(venv / "bin" / "python", tmp_path / "wheelhouse", "--no-deps", "--no-cache-dir",
                 sdnotify)
    assert [wheel.name for wheel in (tmp_path / "wheelhouse").glob("sdnotify-*.whl")]


def test_first_converge_changes_both_hosts(fleet: Fleet) -> None:
    recap = fleet.first_recap  # type: ignore[attr-defined]
    assert all(changed > 0 and failed == 0 for changed, failed in recap.values()), recap


def test_files_owners_modes_and_rendered_config(fleet: Fleet) -> None:
    uid = pwd.getpwnam(USER).pw_uid
    for host, variables in fleet.hosts.items():
        home = fleet.home(host)
        for name in KEY_FILES:
            info = (home / "secrets" / name).stat()
            assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == uid, (host, name)
        assert stat.S_IMODE((home / "secrets").stat().st_mode) == 0o700
        assert home.stat().st_uid == uid and stat.S_IMODE(home.stat().st_mode) == 0o750
        for cert in ("tls/ca.pem", "tls/node.pem", "site-id"):
            assert (home / cert).stat().st_uid == uid
        config = fleet.prefix(host) / "etc/pacs-edge/pacs-edge.toml"
        assert (home / "pacs-edge.toml").resolve() == config
        assert stat.S_IMODE(config.stat().st_mode) == 0o640
        text = config.read_text()
        assert text.startswith("#") and "Ansible managed" in text.splitlines()[0]
        assert f'ae_title = "{variables["pacs_edge_ae_title"]}"' in text
        assert f'\nport = {variables["pacs_edge_dicom_port"]}\n' in text
        assert f'\ntls_port = {variables["pacs_edge_dicom_tls_port"]}\n' in text
        assert "evict_after_days = 14.0" in text
        plain = "false" if host == TLS_ONLY_HOST else "true"
        assert f"\nplain_enabled = {plain}\n" in text
        assert tomllib.loads(text)["hl7"] == {
            "port": variables["pacs_edge_hl7_port"], "host": "127.0.0.1",
            "tls": host == TLS_ONLY_HOST, "tls_require_client_cert": True,
            "max_message_bytes": 1048576, "idle_timeout": 60.0, "max_connections": 16,
            "processing_ids": ["P"], "unnamed_charset": "UNICODE UTF-8"}
        web = tomllib.loads(text)
        assert web["dicom"]["extra_storage_classes"] == []
        assert web["http"] == {
            "port": variables["pacs_edge_http_port"], "host": "127.0.0.1",
            "max_connections": 64, "connections_per_address": 32,
            "max_request_mb": variables.get(
                "pacs_edge_http_max_request_mb", 2048),
            "idle_timeout": 75.0, "head_timeout": 10.0,
            "viewer_root": str(_delivered_viewer(fleet, host).parent / "current"),
            "metadata_cache_mb": 1024,
            "qido_max_results": 5000, "recall_wait_seconds": 15.0}
        assert web["auth"] == {
            "min_password_length": 12,
            "max_failed_logins": variables.get("pacs_edge_auth_max_failed_logins", 5),
            "lockout_minutes": 15.0, "failed_logins_per_address": 20,
            "session_idle_minutes": 30.0, "session_max_hours": 12.0,
            "link_max_ttl_minutes": 60.0}
        peers = tomllib.loads((home / "peers.toml").read_text())["peers"]
        assert peers["testscu"]["allow"] == ["find", "store"]
        # Every field is written; what the inventory leaves out is least privilege.
        assert peers["ct1"] == {"ae_title": "CT1", "host": "127.0.0.1", "port": 104,
                                "allow": ["store"], "bind_host": True, "tls": False,
                                "tls_only": False}
        assert peers["ws1"] == {"ae_title": "WS1", "host": "127.0.0.1", "port": 104,
                                "allow": ["find", "move"], "bind_host": False, "tls": True,
                                "tls_only": True}
        # An HL7 sender is known by its host: no port of its own.
        assert peers["ris"] == {"ae_title": "RIS", "host": "127.0.0.1", "port": 0,
                                "allow": ["hl7"], "bind_host": True, "tls": False,
                                "tls_only": False}
        units = fleet.prefix(host) / "etc/systemd/system"
        assert all((units / u).exists() for u in ("pacs-edge.service", "pacs-edge-sync.service"))
        assert not (units / "pacs-edge.service.d/privileged-port.conf").exists()  # port >= 1024
        # As the service user, as the role does: root is refused in its home.
        check = subprocess.run([str(fleet.venv(host) / "bin/pacs-edge"), "config", "check",
                                "--home", str(home)], capture_output=True, text=True,
                               user=USER, group=USER, extra_groups=[], cwd="/")
        assert check.returncode == 0, check.stderr


def _delivered_viewer(fleet: Fleet, host: str, build: Path = VIEWER_BUILD) -> Path:
    """The one versioned viewer folder on the host, which the link `current` (what
    `[http] viewer_root` names) points to; nothing else is left beside them."""
    link = fleet.viewers(host) / "current"
    folders = [p for p in fleet.viewers(host).iterdir() if p != link]
    assert len(folders) == 1 and folders[0].name.startswith(build.name + "-"), folders
    assert os.readlink(link) == folders[0].name  # relative: the folder beside it
    return folders[0]


def test_viewer_build_is_on_each_host_whole_without_source_maps(fleet: Fleet) -> None:
    """Every file of the controller's build reached the host (root's, readable by the
    service user), no source map did, and the stamp records the archive's checksum."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    built = files(VIEWER_BUILD)
    assert "index.html" in built
    for host in fleet.hosts:
        viewer = _delivered_viewer(fleet, host)
        delivered = files(viewer)
        assert delivered == {f for f in built if not f.endswith(".map")} | {
            ".pacs-edge-delivered"}, host
        assert not [f for f in delivered if f.endswith(".map")]
        assert (viewer / "index.html").read_bytes() == (VIEWER_BUILD / "index.html").read_bytes()
        assert re.fullmatch(r"[0-9a-f]{64}\n", (viewer / ".pacs-edge-delivered").read_text())
        for path in [viewer, *viewer.rglob("*")]:
            info = path.stat()
            assert info.st_uid == 0 and info.st_mode & 0o004, path  # root's, world-readable
            assert not info.st_mode & 0o022, path  # and only root writes


def _https_get(port: int, path: str, ca: Path) -> tuple[int, bytes]:
    """GET over TLS, verifying the box's certificate against its site CA."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context,
                                    timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_prometheus_file_sd_lists_every_box_and_promtool_accepts_it(fleet: Fleet) -> None:
    targets = json.loads(fleet.file_sd.read_text())
    assert targets == [
        {"targets": [f"{host}:{fleet.hosts[host]['pacs_edge_http_port']}"],
         "labels": {"job": "pacs-edge", "box": host, "__scheme__": "https"}}
        for host in HOSTS]
    for host in HOSTS:
        config = tomllib.loads((fleet.prefix(host) / "etc/pacs-edge/pacs-edge.toml").read_text())
        assert config["metrics"]["allow"] == ["127.0.0.1/32", "10.0.0.0/8"]
    prometheus = fleet.base / "prometheus" / "prometheus.yml"
    prometheus.write_text(yaml.safe_dump({"scrape_configs": [{
        "job_name": "pacs-edge", "tls_config": {"ca_file": "site-ca.pem"},
        "file_sd_configs": [{"files": [str(fleet.file_sd)]}]}]}))
    (prometheus.parent / "site-ca.pem").write_bytes(
        (fleet.home(HOSTS[0]) / "tls" / "ca.pem").read_bytes())
    check = subprocess.run(["promtool", "check", "config", str(prometheus)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_deployed_units_are_the_systemd_folders_units(fleet: Fleet) -> None:
    """The role's unit templates cannot drift from systemd/: rendered with the default
    paths and user they are the same files, but for the `Ansible managed` line."""
    host = HOSTS[0]
    for unit in ("pacs-edge.service", "pacs-edge-sync.service"):
        deployed = (fleet.prefix(host) / "etc/systemd/system" / unit).read_text()
        header, body = deployed.split("\n", 1)
        assert "Ansible managed" in header
        body = body.replace(str(fleet.prefix(host)), "").replace(USER, "pacs-edge")
        assert body == (ROOT / "systemd" / unit).read_text()


def test_each_host_serves_from_its_deployed_unit_with_only_the_secrets_it_reads(
    fleet: Fleet,
) -> None:
    """serve from the deployed venv, as the service user, in the deployed unit's view;
    edge-a answers on its plain port and refuses the TLS-only peer there; edge-b has no
    plain port and answers over TLS with a certificate its own CA issued."""
    pw = pwd.getpwnam(USER)
    for host, variables in fleet.hosts.items():
        home, venv = fleet.home(host), fleet.venv(host)
        certs = fleet.base / f"{host}-certs"
        certs.mkdir(exist_ok=True)
        os.chown(certs, pw.pw_uid, pw.pw_gid)
        if not (certs / "testscu").exists():
            subprocess.run([str(venv / "bin/pacs-edge"), "certs", "issue", "testscu", "--out",
                            str(certs / "testscu"), "--home", str(home)], check=True,
                           capture_output=True, user=USER, group=USER, extra_groups=[], cwd="/")
        with _serving(fleet, host) as (log_path, report):
            hl7_ready = (f"hl7 listener ready host=127.0.0.1 port={variables['pacs_edge_hl7_port']}"
                         f" tls={host == TLS_ONLY_HOST}")
            assert hl7_ready in log_path.read_text(errors="replace")
            http_port = int(str(variables["pacs_edge_http_port"]))
            status, body = _https_get(http_port, "/login", home / "tls/ca.pem")
            assert status == 200 and b"<form" in body, (status, body[:500])
            # The viewer's manifest (served without a login) comes from the delivered build.
            status, body = _https_get(http_port, "/manifest.json", home / "tls/ca.pem")
            assert status == 200
            assert body == (_delivered_viewer(fleet, host) / "manifest.json").read_bytes()
            seen = unitsandbox.read_report(report)
            assert {p for p, state in seen.items() if state == "readable"} == {
                str(home / "secrets" / name) for name in SERVE_READS}, seen
            aec = str(variables["pacs_edge_ae_title"])
            port = int(str(variables["pacs_edge_dicom_port"]))
            tls_port = int(str(variables["pacs_edge_dicom_tls_port"]))
            client = certs / "testscu"
            tls = ["+tls", str(client / "testscu.key"), str(client / "testscu.pem"),
                   "+cf", str(client / "ca.pem"), "--profile-bcp195-nd"]
            dcmtk.echoscu(tls_port, aec=aec, args=tls).check()
            if host == TLS_ONLY_HOST:
                assert not dcmtk.echoscu(port, aec=aec).ok  # nothing listens there
            else:
                dcmtk.echoscu(port, aec=aec).check()
                assert not dcmtk.echoscu(port, aet="WS1", aec=aec).ok  # TLS-only peer


@contextlib.contextmanager
def _serving(fleet: Fleet, host: str) -> Iterator[tuple[Path, Path]]:
    """The host's serve from its deployed venv, as the service user, in its deployed
    unit's view, ready for DICOM and HTTPS; yields its log and the unit view's probe
    report (of every file in secrets/); stopped with SIGTERM, which it must exit 0 on."""
    home, venv = fleet.home(host), fleet.venv(host)
    log_path, report = fleet.base / f"{host}-serve.log", fleet.base / f"{host}-report"
    probes = sorted((home / "secrets").iterdir())
    with open(log_path, "wb") as log:
        proc = unitsandbox.start(
            fleet.prefix(host) / "etc/systemd/system/pacs-edge.service",
            [str(venv / "bin/pacs-edge"), "serve", "--home", str(home)], user=USER,
            group=USER, probes=probes, report=report, stage=fleet.base / f"{host}-stage",
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/")
    try:
        deadline = time.monotonic() + 60
        https_ready = ("https server ready host=127.0.0.1 "
                       f"port={fleet.hosts[host]['pacs_edge_http_port']}")
        for ready in ("ready to accept associations", https_ready):
            while ready not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield log_path, report
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()


def test_second_converge_changes_nothing(fleet: Fleet) -> None:
    recap = fleet.converge()
    assert recap == {host: (0, 0) for host in HOSTS}


def test_check_diff_on_a_converged_box_shows_only_the_pending_changes(fleet: Fleet) -> None:
    """--check --diff with one peer more and a node certificate due for renewal (its 365
    days within pacs_edge_cert_renew_days 400): the allowlist's diff and the renewal,
    changed=2, the reload of serve alone (for the certificate: the allowlist is read
    live; a renewed certificate needs no restart), and nothing written or renewed; the
    venv is not shown as changed."""
    host = "edge-a"
    peers, cert = fleet.home(host) / "peers.toml", fleet.home(host) / "tls/node.pem"
    before = {path: path.read_bytes() for path in (peers, cert)}
    listed = yaml.safe_load(fleet.inventory.read_text())["pacs_edge"]["vars"]["pacs_edge_peers"]
    added = [*listed, {"name": "ws9", "ae_title": "WS9", "host": "127.0.0.9", "port": 104}]
    proc = _play(fleet.inventory, fleet.base, "--check", "--diff", "--limit", host,
                 "-e", json.dumps({"pacs_edge_peers": added, "pacs_edge_cert_renew_days": 400}))
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and recap == {host: (2, 0)}, proc.stdout[-8000:]
    assert re.search(r"^\+\[peers\.ws9\]$", proc.stdout, re.MULTILINE), proc.stdout[-8000:]
    assert re.search(r"TASK \[pacs_edge : Renew the node certificate[^\]]*\] \**\nchanged: ",
                     proc.stdout), proc.stdout[-8000:]
    handlers = re.findall(r"^RUNNING HANDLER \[pacs_edge : ((?:Restart|Reload) [^\]]+)\]",
                          proc.stdout, re.MULTILINE)
    assert handlers == ["Reload pacs-edge"], proc.stdout[-8000:]
    assert {path: path.read_bytes() for path in before} == before


def test_a_name_added_to_the_inventory_renews_the_node_certificate(fleet: Fleet) -> None:
    """`init` made the node certificate at the first run; a name added to
    pacs_edge_tls_extra_sans later renews it (same key, the names it had kept) and
    reloads serve alone, restarting nothing; the next run finds it complete and changes
    nothing."""
    host = "edge-b"
    tls = fleet.home(host) / "tls/node.pem"
    key = (fleet.home(host) / "secrets/node.key").read_bytes()
    names = {"pacs_edge_tls_extra_sans": ["edge-b.example.org", "10.9.8.7"]}
    proc = _play(fleet.inventory, fleet.base, "--limit", host, "-e", json.dumps(names))
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert re.search(r"TASK \[pacs_edge : Renew the node certificate[^\]]*\] \**\nchanged: ",
                     proc.stdout), proc.stdout[-8000:]
    assert "RUNNING HANDLER [pacs_edge : Reload pacs-edge]" in proc.stdout
    assert "RUNNING HANDLER [pacs_edge : Restart pacs-edge]" not in proc.stdout
    assert "RUNNING HANDLER [pacs_edge : Restart pacs-edge-sync]" not in proc.stdout
    shown = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                            str(tls)], capture_output=True, text=True, check=True).stdout
    for name in ("DNS:edge-b.example.org", "IP Address:10.9.8.7", "DNS:localhost",
                 "IP Address:127.0.0.1"):
        assert name in shown, shown
    assert (fleet.home(host) / "secrets/node.key").read_bytes() == key
    proc = _play(fleet.inventory, fleet.base, "--limit", host, "-e", json.dumps(names))
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert recap == {host: (0, 0)}, proc.stdout[-8000:]


def test_the_rotate_site_key_tag_rotates_the_key_and_runs_nothing_else(fleet: Fleet) -> None:
    """`--tags rotate_site_key` runs `pacs-edge keys rotate` as the service user and no
    other task of the role (no install, no config, no handler): a new site key, the old
    one retired, its output in the play (with the escrow reminder). Without the tag no
    run rotates (the second converge changed nothing). The sync agent's stop and start
    around it need systemd as PID 1, which the test hosts lack."""
    host = "edge-b"
    secrets = fleet.home(host) / "secrets"
    before = (secrets / "site.key").read_bytes()
    proc = _play(fleet.inventory, fleet.base, "--limit", host, "--tags", "rotate_site_key")
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and recap == {host: (1, 0)}, proc.stdout[-8000:]
    tasks = re.findall(r"^TASK \[pacs_edge : ([^\]]+)\]", proc.stdout, re.MULTILINE)
    assert tasks[0].startswith("Validating arguments against arg spec 'main'"), tasks
    assert tasks[1:] == ["Find out whether systemd runs as PID 1",
                         "Decide whether to manage the services",
                         "Stop the sync agent for the rotation",
                         "Rotate the site key and re-wrap every pack's data key under it",
                         "Show what the rotation did and that the new key needs an escrow",
                         "Start the sync agent again"], tasks
    assert "RUNNING HANDLER" not in proc.stdout
    assert "escrow the new site key now" in proc.stdout, proc.stdout[-8000:]
    info = (secrets / "site.key").stat()
    assert (secrets / "site.key").read_bytes() != before
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, pwd.getpwnam(USER).pw_uid)
    assert sorted(p.name for p in secrets.glob("site.key*")) == ["site.key"]


def test_a_bad_config_or_allowlist_never_replaces_the_live_file(fleet: Fleet) -> None:
    """Past the preflight (--start-at-task skips it, as a variable it does not know would),
    pacs-edge itself checks each new file before it replaces the live one: two listeners
    on one port, two peers with one AE title (serve would refuse every peer) stop the
    play with the files on the box as they were."""
    host = "edge-a"
    config = fleet.prefix(host) / "etc/pacs-edge/pacs-edge.toml"
    peers = fleet.home(host) / "peers.toml"
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (config, peers)}
    listed = yaml.safe_load(fleet.inventory.read_text())["pacs_edge"]["vars"]["pacs_edge_peers"]
    clash = {"pacs_edge_http_port": 0,
             "pacs_edge_metrics_port": fleet.hosts[host]["pacs_edge_dicom_port"]}
    twice = {"pacs_edge_peers": [*listed, {"name": "ct2", "ae_title": " CT1 ",
                                           "host": "127.0.0.2", "port": 104}]}
    for variables, problem in (
        (clash, "[dicom] port and [metrics] port both listen on 127.0.0.1:"),
        (twice, "an AE title no other peer has (peers.ct1 has it)"),
    ):
        proc = _play(fleet.inventory, fleet.base, "--limit", host, "--start-at-task",
                     "Write the configuration file", "-e", json.dumps(variables))
        assert proc.returncode != 0 and "failed to validate" in proc.stdout, proc.stdout[-6000:]
        assert problem in proc.stdout, proc.stdout[-6000:]
        assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in before} == before


def test_a_config_whose_files_are_refused_is_put_back_and_restarts_nothing(
    fleet: Fleet,
) -> None:
    """A value the template's validate: step cannot judge (a credentials file missing on
    the box) passes it; the whole `config check` as the service user refuses it. The play
    stops for that host with the refusal's message, the previous config is back in place
    (no backup left behind), and the restarts the new config notified are skipped for
    that reason (-v shows the condition a skipped handler stopped at): the services keep
    running the config they have."""
    host = "edge-a"
    config_dir = fleet.prefix(host) / "etc/pacs-edge"
    before = (config_dir / "pacs-edge.toml").read_bytes()
    proc = _play(fleet.inventory, fleet.base, "-v", "--limit", host, "-e", json.dumps({
        "pacs_edge_cloud_url": "azure://packs",
        "pacs_edge_cloud_credentials_file": "/nonexistent/cloud-credentials"}))
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode != 0 and recap[host][1] == 1, proc.stdout[-8000:]
    assert (config_dir / "pacs-edge.toml").read_bytes() == before
    assert "config check refused the configuration of edge-a; the previous one is back in " \
        "place, and no service was restarted: " in proc.stdout, proc.stdout[-8000:]
    assert "cannot read the credentials file" in proc.stdout, proc.stdout[-8000:]
    assert sorted(p.name for p in config_dir.iterdir()) == ["pacs-edge.toml"]
    for handler in ("Restart pacs-edge", "Restart pacs-edge-sync"):
        ran = re.search(rf"RUNNING HANDLER \[pacs_edge : {handler}\] \**\n(.*)\n", proc.stdout)
        assert ran and ran[1].startswith(f"skipping: [{host}]") and \
            '"false_condition": "pacs_edge__config_checked' in ran[1], proc.stdout[-8000:]


def test_changing_one_host_variable_changes_only_that_host(fleet: Fleet) -> None:
    fleet.hosts["edge-b"]["pacs_edge_ae_title"] = "EDGE_B_RENAMED"
    # A connection string an earlier run wrote, since dropped from the inventory: the
    # secret must not stay on the box.
    stale_secret = fleet.prefix("edge-b") / "etc/pacs-edge/cloud-credentials"
    stale_secret.write_text("DefaultEndpointsProtocol=https;AccountKey=OLD\n")
    stale_secret.chmod(0o600)
    # A secrets folder left open (a restore, a home made by hand) is made 0700 again.
    secrets = fleet.home("edge-b") / "secrets"
    os.chown(secrets, 0, 0)
    secrets.chmod(0o755)
    # Dependency wheels gone from the box or changed there are copied again, root's, 0644.
    deps = fleet.prefix("edge-b") / "opt/pacs-edge/wheels/deps"
    lost, opened, altered = sorted(deps.glob("*.whl"))[:3]
    lost.unlink()
    opened.chmod(0o666)
    altered.write_bytes(b"not the wheel")
    wheel_vars = yaml.safe_load(fleet.inventory.read_text())["pacs_edge"]["vars"]
    fleet.write_inventory(Path(wheel_vars["pacs_edge_wheel"]),
                          Path(wheel_vars["pacs_edge_wheelhouse"]))
    recap = fleet.converge()
    assert recap["edge-a"] == (0, 0)
    assert recap["edge-b"][0] > 0 and recap["edge-b"][1] == 0
    config = fleet.prefix("edge-b") / "etc/pacs-edge/pacs-edge.toml"
    assert 'ae_title = "EDGE_B_RENAMED"' in config.read_text()
    assert not stale_secret.exists()
    info = secrets.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, pwd.getpwnam(USER).pw_uid)
    wheelhouse = Path(wheel_vars["pacs_edge_wheelhouse"])
    for path in (lost, opened, altered):
        info = path.stat()
        assert path.read_bytes() == (wheelhouse / path.name).read_bytes(), path.name
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o644, 0, 0), path.name


def test_a_new_viewer_build_goes_live_with_no_moment_without_one(fleet: Fleet) -> None:
    """A run that delivers another viewer build switches a running serve to it whole: polled
    all through the run, /manifest.json (served without a login, and only with an
    index.html under the viewer root) answers the old build's bytes, then the new build's,
    and nothing else in between, with no restart; the old build is gone after the run.
    The new build is the old one's index.html, a manifest of its own and a stamp that
    install-ohif.sh would have written for another build (another build id)."""
    host = "edge-a"
    build = fleet.base / "viewer-next" / VIEWER_BUILD.name
    build.mkdir(parents=True)
    shutil.copy(VIEWER_BUILD / "index.html", build / "index.html")
    manifest = json.loads((VIEWER_BUILD / "manifest.json").read_bytes())
    (build / "manifest.json").write_text(json.dumps({**manifest, "name": "next build"}))
    (build / ".pacs-edge-installed").write_text(
        (VIEWER_BUILD / ".pacs-edge-installed").read_text() + "next build\n")
    config = fleet.prefix(host) / "etc/pacs-edge/pacs-edge.toml"

    def live() -> Path:  # the folder serve's viewer_root resolves to
        return Path(tomllib.loads(config.read_text())["http"]["viewer_root"]).resolve()

    old_build = live()
    bodies = {(old_build / "manifest.json").read_bytes(): "old",
              (build / "manifest.json").read_bytes(): "new"}
    port = int(str(fleet.hosts[host]["pacs_edge_http_port"]))
    ca = fleet.home(host) / "tls/ca.pem"
    answers: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            try:
                status, body = _https_get(port, "/manifest.json", ca)
            except OSError as error:
                answers.append(f"no answer: {error}")
                continue
            answers.append(bodies.get(body, f"{status} {body[:200]!r}") if status == 200
                           else f"{status} {body[:200]!r}")

    with _serving(fleet, host):
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            proc = _play(fleet.inventory, fleet.base, "--limit", host, "-e",
                         json.dumps({"pacs_edge_viewer_build": str(build)}))
            deadline = time.monotonic() + 30
            while answers[-1:] != ["new"] and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            poller.join(30)
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and recap[host][0] > 0 and recap[host][1] == 0, \
        proc.stdout[-8000:]
    switched = answers.index("new") if "new" in answers else len(answers)
    assert switched > 0 and set(answers[:switched]) == {"old"} \
        and set(answers[switched:]) == {"new"}, sorted(set(answers))
    assert "RUNNING HANDLER" not in proc.stdout, proc.stdout[-8000:]
    assert live() == _delivered_viewer(fleet, host, build) != old_build
    assert not old_build.exists()


def _version_of(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def test_an_upgrade_that_fails_late_still_restarts_and_runs_the_new_version(
    fleet: Fleet,
) -> None:
    """A wheel the host already has in wheels/ (a rollback): the copy is "ok", only the
    install changes the venv, and must restart both services; the run then fails late
    (an unwritable Prometheus target file) and the restart must still happen, since a
    re-run would find nothing changed. Only this run's wheel stays in wheels/, and
    `pacs-edge --version` names the installed one."""
    host = "edge-a"
    tree = fleet.base / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for package in ("appliance", "sync", "provisioning"):
        shutil.copytree(ROOT / package, tree / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (tree / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)[1]  # type: ignore[index]
    (tree / "pyproject.toml").write_text(pyproject.replace(
        f'version = "{version}"', f'version = "{version}.post1"', 1))
    dist = fleet.base / "dist-post1"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(dist), str(tree)],
                   check=True, timeout=600, capture_output=True)
    rollback = next(dist.glob("pacs_edge-*.whl"))
    assert _version_of(rollback) == f"{version}.post1"
    wheels = fleet.prefix(host) / "opt/pacs-edge/wheels"
    shutil.copy(rollback, wheels / rollback.name)  # the host had it before
    (wheels / rollback.name).chmod(0o644)
    (wheels / "pacs_edge-0.0.1-py3-none-any.whl").write_bytes(b"an older one")
    proc = _play(fleet.inventory, fleet.base, "--limit", host, "-e", json.dumps({
        "pacs_edge_wheel": str(rollback),
        "pacs_edge_prometheus_file_sd": "/proc/pacs-edge-test/pacs-edge.json"}))
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode != 0 and recap[host][1] == 1, proc.stdout[-8000:]
    tasks = re.findall(r"^TASK \[pacs_edge : ([^\]]+)\]", proc.stdout, re.MULTILINE)
    assert tasks[-1].startswith("Create the folder of the target file"), tasks[-3:]
    for task, result in (("Copy the pacs-edge wheel", "ok"),
                         ("Install pacs-edge into the venv", "changed")):
        assert re.search(rf"TASK \[pacs_edge : {task}\] \**\n{result}: \[{host}\]",
                         proc.stdout), proc.stdout[-8000:]
    for handler in ("Restart pacs-edge", "Restart pacs-edge-sync"):
        assert f"RUNNING HANDLER [pacs_edge : {handler}]" in proc.stdout, proc.stdout[-8000:]
    shown = subprocess.run([str(fleet.venv(host) / "bin/pacs-edge"), "--version"],
                           capture_output=True, text=True, check=True, cwd="/")
    assert {"wheels": sorted(p.name for p in wheels.glob("pacs_edge-*.whl")),
            "version": shown.stdout.strip()} == {
        "wheels": [rollback.name], "version": f"pacs-edge, version {version}.post1"}


def test_ansible_lint_passes_with_the_production_profile(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "ansible-lint"), "--nocolor"], capture_output=True,
                          text=True, timeout=600, cwd=ANSIBLE_DIR,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                               "ANSIBLE_HOME": str(tmp_path / ".ansible")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_preflight_refuses_bad_settings_before_changing_anything(tmp_path: Path) -> None:
    """An HTTPS port that is a DICOM port, a viewer folder that install-ohif.sh did not
    make, peers sharing a name or an AE title (leading and trailing spaces do not count) or
    with an AE title pacs-edge refuses, a metrics port out of range or on the DICOM port
    with the web server off, a negative eviction age, an install folder with a space (the
    units' ExecStart= names it), a control character in any setting the units or their
    drop-ins are written with (a newline there adds lines to the unit; a cloud URL's %0A
    becomes one in cloud-folder.conf once decoded): each stops its host at the preflight
    with a message naming the variable; so does a pacs_edge_settings key that has a
    variable of its own, a null, a key that is no bare TOML key, or a store or drop
    folder outside the data home; a rehydration priority Azure does not know stops it
    earlier, at the role's argument spec (its choices)."""
    wheel = tmp_path / "pacs_edge-0.1.0-py3-none-any.whl"
    wheel.touch()  # the preflight checks the name; nothing gets installed
    not_a_build = tmp_path / "viewer"
    not_a_build.mkdir()
    (not_a_build / "app.bundle.js.map").touch()
    peer = {"name": "ct1", "ae_title": "CT1", "host": "10.0.0.21", "port": 104}
    # Each of these, in one host's inventory, would have left a file serve refuses (or
    # cannot start with) on the box before the play failed.
    bad_hosts: dict[str, dict[str, object]] = {
        "peer-ae-twice": {"pacs_edge_peers": [peer, {**peer, "name": "ct2",
                                                      "ae_title": " CT1 "}]},
        "peer-name-twice": {"pacs_edge_peers": [peer, {**peer, "ae_title": "CT2"}]},
        "peer-ae-backslash": {"pacs_edge_peers": [{**peer, "ae_title": "C\\T1"}]},
        "peer-ae-control": {"pacs_edge_peers": [{**peer, "ae_title": "CT\t1"}]},
        "metrics-port": {"pacs_edge_metrics_port": 70000},
        "metrics-on-dicom": {"pacs_edge_http_port": 0, "pacs_edge_metrics_port": 11112},
        "evict-negative": {"pacs_edge_sync_evict_after_days": -1},
        # ExecStart= would run /opt/pacs with the rest as arguments.
        "install-dir-space": {"pacs_edge_install_dir": "/opt/pacs edge"},
        "rehydrate-priority": {"pacs_edge_sync_rehydrate_priority": "urgent"},
        # An empty vault variable: the agent could not open the container.
        "azure-no-credentials": {"pacs_edge_cloud_url": "azure://site-packs",
                                 "pacs_edge_cloud_connection_string": ""},
        # Decoded into cloud-folder.conf: ReadWritePaths=/mnt/nas, then a line of its own.
        "cloud-url-newline": {"pacs_edge_cloud_url":
                              "file:///mnt/nas%0AExecStartPre=/bin/touch%20/tmp/owned"},
        # A trailing newline passes the /var/lib/NAME pattern (Python's `$`).
        "home-newline": {"pacs_edge_home": "/var/lib/pacs-edge\n"},
        "user-tab": {"pacs_edge_user": "pacs\tedge"},
        "credentials-del": {"pacs_edge_cloud_url": "azure://site-packs",
                            "pacs_edge_cloud_credentials_file": "/etc/pacs-edge/creds\x7f"},
        # A second route to a key the preflight checks, and the units are written from.
        "settings-own-variable": {"pacs_edge_settings": {"hl7": {"message_timeout": 30,
                                                                 "port": 104}}},
        "settings-null": {"pacs_edge_settings": {"audit": {"syslog_ca_file": None}}},
        # A key is written bare: this one would end its line and open [dicom].
        "settings-key-lines": {"pacs_edge_settings": {"hl7": {"idle = 1\n[dicom]\nport": 104}}},
        # ProtectSystem=strict: serve could write neither.
        "settings-store-outside": {"pacs_edge_settings": {"store": {"path": "/srv/store"}}},
        "settings-drop-up": {"pacs_edge_settings": {"dropfolder": {"paths": ["in", "../x"]}}},
    }
    unique, complete = ("Assert that each peer has a name and an AE title of its own",
                        "Assert that every peer is complete and allowed only known services")
    metrics, cloud = ("Assert that the metrics settings are valid",
                      "Assert that the cloud and eviction settings are valid")
    paths = "Assert that the paths fit the systemd units"
    shape, own, home_paths = (
        "Assert that pacs_edge_settings holds tables of settings",
        "Assert that pacs_edge_settings leaves the keys of the role's own variables alone",
        "Assert that pacs_edge_settings puts the folders the services write in the data home")
    control = "Assert that the settings written into the systemd units hold no control character"
    expected_task = {"peer-ae-twice": unique, "peer-name-twice": unique,
                     "peer-ae-backslash": complete, "peer-ae-control": complete,
                     "metrics-port": metrics, "metrics-on-dicom": metrics,
                     "evict-negative": cloud, "install-dir-space": paths,
                     "rehydrate-priority": "Validating arguments against arg spec 'main' -"
                                           " Install, configure and start a pacs-edge box",
                     "azure-no-credentials": cloud, "cloud-url-newline": control,
                     "home-newline": control, "user-tab": control, "credentials-del": control,
                     "settings-own-variable": own, "settings-null": shape,
                     "settings-key-lines": shape, "settings-store-outside": home_paths,
                     "settings-drop-up": home_paths}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"pacs_edge": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": str(HOST_PYTHON),
                 "pacs_edge_wheel": str(wheel),
                 # Should a host get past the preflight: no system user made, stop there.
                 "pacs_edge_manage_user": False, "pacs_edge_user": f"pacsedge-p{os.getpid()}",
                 "pacs_edge_root_prefix": str(tmp_path / "root")},
        "hosts": {"same-port": {"pacs_edge_http_port": 11112},
                  "no-build": {"pacs_edge_viewer_build": str(not_a_build)},
                  **bad_hosts}}}))
    # Every host in one batch: by default the first one failing alone stops the play.
    proc = _play(inventory, tmp_path, "-e", json.dumps({"pacs_edge_serial": 0}))
    recap = {m[1]: int(m[5]) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode != 0 and recap == {
        "same-port": 1, "no-build": 1, **{host: 1 for host in bad_hosts}}, proc.stdout
    assert "pacs_edge_http_port must be 0 (off) or 1-65535 and not a DICOM or HL7 port (is 11112)" \
        in proc.stdout
    assert "pacs_edge_viewer_build must name the folder scripts/install-ohif.sh installed" \
        in proc.stdout
    # Each host stopped at the preflight task that names its mistake.
    for host, task in expected_task.items():
        failed_in = re.search(rf"TASK \[pacs_edge : ([^\]]+)\][^\n]*\n(?:(?!TASK ).*\n)*?"
                              rf"(?:fatal|failed): \[{host}\]", proc.stdout)
        assert failed_in and failed_in[1] == task, (host, failed_in and failed_in[1])
    assert "pacs_edge_metrics_port must be 0 (off) or 1-65535 and, with pacs_edge_http_port 0," \
        " not a DICOM or HL7 port (is 70000" in proc.stdout
    assert "(pacs_edge_sync_evict_after_days is -1)" in proc.stdout
    assert 'ExecStart= names it; is \\"/opt/pacs edge\\"' in proc.stdout
    assert "pacs_edge_sync_rehydrate_priority must be one of: standard, high" in proc.stdout
    assert 'must be empty, file:///PATH or azure://CONTAINER (is \\"azure://site-packs\\")' \
        in proc.stdout
    assert 'peer \\"ct2\\" (AE title \\"CT1\\") shares its name or its AE title' in proc.stdout
    for variable in ("pacs_edge_cloud_url (percent-decoded)", "pacs_edge_home", "pacs_edge_user",
                     "pacs_edge_cloud_credentials_file"):
        assert f"{variable} is written into a systemd unit or drop-in and must not hold a " \
            "control character" in proc.stdout, variable
    assert "pacs_edge_settings: [hl7] port is set with pacs_edge_hl7_port, not here" \
        in proc.stdout
    assert "[store] path must name folders inside the data home" in proc.stdout
    assert not (tmp_path / "root").exists()


def test_a_failed_first_box_stops_the_roll_out_before_the_others(tmp_path: Path) -> None:
    """The example playbook rolls out the first box alone (a canary), then a quarter of the
    fleet at a time: a first box that fails stops the play before any other box is
    touched, and the recap names it."""
    wheel = tmp_path / "pacs_edge-0.1.0-py3-none-any.whl"
    wheel.touch()
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"pacs_edge": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": str(HOST_PYTHON),
                 "pacs_edge_wheel": str(wheel), "pacs_edge_manage_user": False,
                 "pacs_edge_user": f"pacsedge-s{os.getpid()}",
                 "pacs_edge_root_prefix": str(tmp_path / "root")},
        "hosts": {"box-1": {"pacs_edge_http_port": 11112}, "box-2": {}, "box-3": {}}}}))
    proc = _play(inventory, tmp_path)
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode != 0 and recap == {"box-1": (0, 1)}, proc.stdout[-6000:]
    assert "[box-2]" not in proc.stdout and "[box-3]" not in proc.stdout, proc.stdout[-6000:]
    assert not (tmp_path / "root").exists()


def test_cloud_credentials_file_is_never_readable_by_others_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection string reaches its file without a moment at a mode others can read:
    every chmod the modules make on the file (seen by an audit hook in the host's Python)
    is 0600. Ansible's copy gives a file it creates the umask's mode (0644) before its
    own mode. The play starts at the config (--start-at-task), the service user root, and
    a stand-in for the installed pacs-edge that accepts everything."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "def _chmod(event, args):\n"
        "    if event == 'os.chmod' and b'cloud-credentials' in os.fsencode(args[0]):\n"
        "        with open(os.environ['PACS_EDGE_TEST_CHMODS'], 'a') as log:\n"
        "            log.write(f'{args[1]:o}\\n')\n"
        "if os.environ.get('PACS_EDGE_TEST_CHMODS'):\n"
        "    sys.addaudithook(_chmod)\n")
    chmods = tmp_path / "chmods"
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("PACS_EDGE_TEST_CHMODS", str(chmods))
    config_dir = tmp_path / "root/etc/pacs-edge"
    config_dir.mkdir(parents=True)
    stand_in = tmp_path / "root/opt/pacs-edge/venv/bin/pacs-edge"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (tmp_path / "root/var/lib/pacs-edge").mkdir(parents=True)
    wheel = tmp_path / "pacs_edge-0.1.0-py3-none-any.whl"
    wheel.touch()
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"pacs_edge": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": str(HOST_PYTHON),
                 "pacs_edge_wheel": str(wheel), "pacs_edge_user": "root",
                 "pacs_edge_group": "root", "pacs_edge_root_prefix": str(tmp_path / "root"),
                 "pacs_edge_cloud_connection_string": "AccountKey=NOT-FOR-OTHERS"},
        "hosts": {"new-box": {}}}}))
    old_umask = os.umask(0o022)
    try:
        proc = _play(inventory, tmp_path, "--start-at-task", "Write the configuration file")
    finally:
        os.umask(old_umask)
    assert "Write the cloud credentials file] ****" in proc.stdout, proc.stdout[-6000:]
    secret = config_dir / "cloud-credentials"
    assert secret.read_text() == "AccountKey=NOT-FOR-OTHERS\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert set(chmods.read_text().split()) == {"600"}


def _stand_in_box(tmp_path: Path, init_fails: Path) -> Path:
    """The root of a box as the role leaves it before its config (the play starts there
    with --start-at-task): a pacs-edge that accepts everything and fails `init` while
    `init_fails` exists, and a venv python that prints a certificate probe's answer."""
    root = tmp_path / "root"
    venv = root / "opt/pacs-edge/venv/bin"
    venv.mkdir(parents=True)
    (root / "etc/pacs-edge").mkdir(parents=True)
    (root / "var/lib/pacs-edge").mkdir(parents=True)
    (venv / "pacs-edge").write_text(
        "#!/bin/sh\n"
        f'case "$1" in init) [ -e {init_fails} ] && {{ echo "no space left" >&2; exit 1; }};'
        ' echo "already initialised; nothing changed";; esac\n')
    (venv / "python").write_text(
        "#!/bin/sh\necho '{\"names\": [], \"days_left\": 300, \"missing\": []}'\n")
    for stand_in in (venv / "pacs-edge", venv / "python"):
        stand_in.chmod(0o755)
    (tmp_path / "pacs_edge-0.1.0-py3-none-any.whl").touch()
    return root


def _play_from_config(tmp_path: Path, root: Path, variables: dict[str, object],
                      *args: str) -> subprocess.CompletedProcess[str]:
    """The playbook from "Write the configuration file" on the stand-in box `root`, as
    root (no service user), with `variables`; the preflight's decision whether systemd
    runs as PID 1, which --start-at-task skips, is no (-e may say yes)."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"pacs_edge": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": str(HOST_PYTHON),
                 "pacs_edge_wheel": str(tmp_path / "pacs_edge-0.1.0-py3-none-any.whl"),
                 "pacs_edge_user": "root", "pacs_edge_group": "root",
                 "pacs_edge_root_prefix": str(root), "pacs_edge__services_run": False,
                 **variables},
        "hosts": {"box": {}}}}))
    return _play(inventory, tmp_path, "--start-at-task", "Write the configuration file", *args)


def test_a_file_cloud_folder_outside_the_home_is_writable_for_the_sync_unit(
    tmp_path: Path,
) -> None:
    """ProtectSystem=strict leaves the sync agent only its data home to write: a file:///
    cloud folder elsewhere (a NAS mount) gets a drop-in with ReadWritePaths= for it, which
    goes again once the cloud is the home's own. Without it the box passes `config check`
    (run outside the unit) and every upload fails on a read-only file system."""
    root = _stand_in_box(tmp_path, tmp_path / "init-fails")
    drop_in = root / "etc/systemd/system/pacs-edge-sync.service.d/cloud-folder.conf"
    proc = _play_from_config(tmp_path, root, {"pacs_edge_cloud_url": "file:///mnt/nas/packs/"})
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert re.findall(r"^ReadWritePaths=.*$", drop_in.read_text(), re.MULTILINE) == [
        "ReadWritePaths=/mnt/nas/packs"]
    for inside in ("", "file:///var/lib/pacs-edge/cloud"):
        proc = _play_from_config(tmp_path, root, {"pacs_edge_cloud_url": inside})
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert not drop_in.exists(), inside


def _systemd_reading(units: Path, unit: str, base: Path, prefix: Path) -> tuple[str, str]:
    """`systemd-analyze verify` of `unit` as the role wrote it (with its drop-ins) under
    `units`: its warnings, and systemd's own dump of the unit as it parsed it (printed at
    the debug log level). The throw-away root holds the host's unit library and stubs
    where ExecStart names the (prefixed) venv and ExecReload= /bin/kill."""
    root = base / "verify-root"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copytree(units, root / "etc/systemd/system")
    for stub in (root / str(prefix).lstrip("/") / "opt/pacs-edge/venv/bin/pacs-edge",
                 root / "bin/kill"):
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)

    def verify(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env={**os.environ, **env})

    quiet = verify()
    return quiet.stdout + quiet.stderr, verify(SYSTEMD_LOG_LEVEL="debug").stdout


def test_unit_paths_from_variables_reach_systemd_as_one_path_each(tmp_path: Path) -> None:
    """A file:/// cloud folder and a cloud credentials file are the operator's paths, and
    may hold a space (systemd splits a setting's paths on it), a double quote or a
    backslash (quoting), a percent sign (a specifier): the sync unit's ReadWritePaths= and
    serve's InaccessiblePaths= name each whole, as systemd itself parses the rendered
    units (`systemd-analyze verify`, which also warns of nothing). Written bare, the folder
    became `/mnt/nas/PACS` and `packs` (not absolute: ignored), leaving the agent's NAS
    folder read-only, and the credentials file was not hidden from serve."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/setup-test-deps.sh)")
    root = _stand_in_box(tmp_path, tmp_path / "init-fails")
    credentials = '/srv/site keys/azure "prod" 100%n\\1.conn'
    proc = _play_from_config(tmp_path, root, {
        "pacs_edge_cloud_url": "file:///mnt/nas/PACS%20packs/",
        "pacs_edge_cloud_credentials_file": credentials})
    assert proc.returncode == 0, proc.stdout[-6000:]
    units = root / "etc/systemd/system"
    for unit, setting, path in (("pacs-edge-sync.service", "ReadWritePaths", "/mnt/nas/PACS packs"),
                                ("pacs-edge.service", "InaccessiblePaths", "-" + credentials)):
        warnings, dump = _systemd_reading(units, unit, tmp_path, root)
        assert warnings == "", warnings
        assert re.findall(rf"^\t+{setting}: (.*)$", dump, re.MULTILINE) == [path], dump[-4000:]


def test_a_run_failing_before_config_check_restarts_nothing_and_the_next_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that writes a new config and fails before the whole `config check` (here
    `init`: a full disk) restarts nothing, though force_handlers runs the handlers: the
    config was never checked. The restarts it owes are recorded on the box, and the next
    run, which finds the config already written and changes nothing else, does them
    (serve first), once: the run after it restarts nothing.

    The play starts at the config (--start-at-task) on a converged stand-in box: a
    pacs-edge that accepts everything unless told to fail `init`, a venv python that
    prints a certificate probe, and a systemctl on PATH that answers as systemd for
    running, enabled units and logs every call. The preflight's decision that systemd
    runs as PID 1 (skipped by --start-at-task) is given with -e."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "systemctl.log"
    (fake / "systemctl").write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> {calls}\n"
        'case "$1" in\n'
        "  show) printf 'Id=%s\\nLoadState=loaded\\nActiveState=active\\n"
        "SubState=running\\nUnitFileState=enabled\\n' \"$2\";;\n"
        "  is-enabled) echo enabled;;\n"
        "esac\n")
    (fake / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    init_fails = tmp_path / "init-fails"
    root = _stand_in_box(tmp_path, init_fails)

    def run(ae_title: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
        calls.unlink(missing_ok=True)
        proc = _play_from_config(tmp_path, root, {"pacs_edge_ae_title": ae_title},
                                 "-e", json.dumps({"pacs_edge__services_run": True}))
        called = calls.read_text().splitlines() if calls.exists() else []
        return proc, [line for line in called if line.startswith("restart ")]

    proc, restarts = run("EDGE")  # converge: first config, units
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert restarts == ["restart pacs-edge.service", "restart pacs-edge-sync.service"]
    init_fails.touch()
    proc, restarts = run("EDGE_NEW")
    assert proc.returncode != 0 and "no space left" in proc.stdout, proc.stdout[-6000:]
    assert 'ae_title = "EDGE_NEW"' in (root / "etc/pacs-edge/pacs-edge.toml").read_text()
    assert restarts == [], proc.stdout[-6000:]
    init_fails.unlink()
    proc, restarts = run("EDGE_NEW")
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and recap["box"][1] == 0, proc.stdout[-6000:]
    assert re.search(r"TASK \[pacs_edge : Write the configuration file\] \**\nok: ",
                     proc.stdout), proc.stdout[-6000:]
    assert restarts == ["restart pacs-edge.service", "restart pacs-edge-sync.service"]
    proc, restarts = run("EDGE_NEW")
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert recap == {"box": (0, 0)} and restarts == [], proc.stdout[-6000:]


def test_settings_without_a_variable_of_their_own_reach_the_box_and_config_check(
    tmp_path: Path,
) -> None:
    """`[hl7] message_timeout`, `[workflow] worklist_past_days` and the other keys without a
    variable of their own reach the box through pacs_edge_settings, a string holding
    quotes, a backslash, a newline, DEL and a character beyond U+FFFF included, and the
    installed pacs-edge accepts the file: its `config check --config-file` (validate:)
    and its whole `config check`, after a real `init`, as the role runs them. The play
    starts at the config (--start-at-task) on a box whose venv runs this checkout's
    pacs-edge. The role had no route to these keys: every box kept their defaults."""
    root = _stand_in_box(tmp_path, tmp_path / "init-fails")
    venv = root / "opt/pacs-edge/venv/bin"
    (venv / "pacs-edge").write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m appliance.cli \"$@\"\n")
    (venv / "python").unlink()
    (venv / "python").symlink_to(sys.executable)  # the certificate probe's cryptography
    site = 'St. "Mary\'s" \\ 𠮷田\nwest wing\x7f'
    proc = _play_from_config(tmp_path, root, {"pacs_edge_settings": {
        "hl7": {"message_timeout": 120.5}, "workflow": {"worklist_past_days": 7},
        "audit": {"site_id": site}, "prefetch": {"modalities": ["CT", "MR"]}}})
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert re.search(r"TASK \[pacs_edge : Check the configuration and every file it names, as"
                     r" the service user\] \**\nok: ", proc.stdout), proc.stdout[-6000:]
    config = load_config(root / "var/lib/pacs-edge")
    assert config.hl7.message_timeout == 120.5
    assert config.workflow.worklist_past_days == 7
    assert config.audit.site_id == site
    assert config.prefetch.modalities == ("CT", "MR")
    assert config.dicom.ae_title == "EDGE"  # the role's own variables, written as before


def test_https_port_below_1024_gets_the_capability_drop_in(tmp_path: Path) -> None:
    """The role's own expression, evaluated by ansible: 443 needs the drop-in (like DICOM
    port 104), 8443 and 0 (off) do not."""
    role = ANSIBLE_DIR / "roles/pacs_edge"
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False, "connection": "local",
        "vars_files": [str(role / "defaults/main.yml"), str(role / "vars/main.yml")],
        "tasks": [{"ansible.builtin.debug": {
            "msg": "privileged {{ port }}={{ pacs_edge__privileged_port | bool }}"},
            "vars": {"pacs_edge_http_port": "{{ port }}"},
            "loop": [443, 8443, 0], "loop_control": {"loop_var": "port"}}]}]))
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", str(play)], capture_output=True,
        text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "ANSIBLE_HOME": str(tmp_path / ".ansible"), "ANSIBLE_NOCOLOR": "1",
             "ANSIBLE_PYTHON_INTERPRETER": str(HOST_PYTHON),
             "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = dict(re.findall(r'"privileged (\d+)=(\w+)"', proc.stdout))
    assert found == {"443": "True", "8443": "False", "0": "False"}, proc.stdout


def test_a_metrics_port_below_1024_with_the_web_server_off_gets_the_capability_drop_in(
    tmp_path: Path,
) -> None:
    """With the web server off, serve opens a plain metrics listener on
    pacs_edge_metrics_port; below 1024 it needs CAP_NET_BIND_SERVICE like a DICOM or HTTPS
    port, or serve stops at start ("cannot listen for HTTP on ...: permission denied"
    under the unit's empty capability set). With the web server on there is no such
    listener, and no capability for it."""
    root = _stand_in_box(tmp_path, tmp_path / "init-fails")
    drop_in = root / "etc/systemd/system/pacs-edge.service.d/privileged-port.conf"
    for http_port, metrics_port, granted in ((0, 999, True), (8443, 999, False),
                                             (0, 9464, False)):
        proc = _play_from_config(tmp_path, root, {"pacs_edge_http_port": http_port,
                                                  "pacs_edge_metrics_port": metrics_port})
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert drop_in.exists() == granted, (http_port, metrics_port)
        assert not granted or "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in drop_in.read_text()


def test_check_mode_on_a_new_host_changes_nothing(tmp_path: Path) -> None:
    """--check on a host never deployed (no user, no folders, no venv, no config file to
    link to) runs through and leaves nothing behind."""
    wheel = tmp_path / "pacs_edge-0.1.0-py3-none-any.whl"
    wheel.touch()
    user = f"pacsedge-c{os.getpid()}"
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"pacs_edge": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": str(HOST_PYTHON),
                 "ansible_become_method": "ansible.builtin.su",
                 "ansible_become_flags": "-s /bin/sh",
                 "pacs_edge_wheel": str(wheel), "pacs_edge_user": user, "pacs_edge_group": user,
                 "pacs_edge_cloud_connection_string": "UseDevelopmentStorage=true",
                 "pacs_edge_peers": [{"name": "ct1", "ae_title": "CT1", "host": "10.0.0.21",
                                      "port": 104}],
                 "pacs_edge_root_prefix": str(tmp_path / "root")},
        "hosts": {"new-box": {}}}}))
    proc = _play(inventory, tmp_path, "--check", "--diff")
    recap = {m[1]: (int(m[3]), int(m[5])) for m in _RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and recap["new-box"][1] == 0, proc.stdout[-8000:]
    assert recap["new-box"][0] > 0  # it would change things
    assert not (tmp_path / "root").exists()
    assert subprocess.run(["id", user], capture_output=True).returncode != 0


def test_prometheus_file_keeps_the_boxes_a_run_did_not_reach(tmp_path: Path) -> None:
    """The target file lists the fleet, not the last run's hosts: a run with --limit, or
    with a box unreachable, keeps the other boxes' entries (an unreachable box is the one
    to alert on) and updates its own; a box taken out of the inventory is dropped. Only
    the role's Prometheus tasks run (--start-at-task): they need nothing installed."""
    file_sd = tmp_path / "prometheus" / "pacs-edge.json"

    def run(hosts: dict[str, dict[str, object]], *args: str) -> dict[str, str]:
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"pacs_edge": {
            "vars": {"ansible_connection": "local",
                     "ansible_python_interpreter": str(HOST_PYTHON),
                     "pacs_edge_prometheus_file_sd": str(file_sd)},
            "hosts": hosts}}))
        # One batch: --start-at-task skips tasks in the first batch only.
        proc = _play(inventory, tmp_path, "--start-at-task",
                     "Reach the box before it gets an entry of this run", "-e",
                     "pacs_edge_serial=0", *args)
        failed = {m[1]: int(m[5]) for m in _RECAP.finditer(proc.stdout)}
        assert failed and not any(failed.values()), proc.stdout[-6000:]
        entries = json.loads(file_sd.read_text())
        return {entry["labels"]["box"]: entry["targets"][0] for entry in entries}

    fleet = {"box-a": {}, "box-b": {}, "box-c": {"pacs_edge_http_port": 9443}}
    assert run(fleet) == {"box-a": "box-a:8443", "box-b": "box-b:8443", "box-c": "box-c:9443"}
    assert run(fleet, "--limit", "box-b", "-e", "pacs_edge_http_port=8444") == {
        "box-a": "box-a:8443", "box-b": "box-b:8444", "box-c": "box-c:9443"}
    # box-b is down (nothing listens on port 1); box-c left the inventory.
    down = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 1}
    assert run({"box-a": {}, "box-b": down}) == {"box-a": "box-a:8443", "box-b": "box-b:8444"}
