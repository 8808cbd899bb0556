"""The systemd units in systemd/: they verify cleanly, and their sandboxing exposure is low.

`systemd-analyze verify` and `systemd-analyze security --offline=true` run on
the units installed into a throw-away root (`--root`): the units under
etc/systemd/system, a copy of the host's own units (sysinit.target and the
rest that every service depends on) under usr/lib/systemd/system, and a stub
executable where ExecStart expects the venv. No systemd needs to be running.
The exposure figures are recorded in docs/security.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
    executable = root / "opt/pacs-edge/venv/bin/pacs-edge"
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
