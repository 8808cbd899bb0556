"""Start a command in the file-system view that a systemd unit gives its service.

Only the directives the privilege split relies on (docs/security.md) are
applied: TemporaryFileSystem=, BindReadOnlyPaths= and InaccessiblePaths=,
and /proc as ProcSubset= and ProtectProc= mount it (`proc_view` applies only
those), with unshare(1) and mount(8), the way systemd's namespace set-up does it:
bind sources are taken from the host's view before anything is hidden (systemd
stages them under /run/systemd/unit-root), a tmpfs covers each
TemporaryFileSystem= path with the bound files mounted into it and is then
made read-only, and an empty mode-000 file covers each InaccessiblePaths=
file. No systemd is needed (it is not PID 1 in the test container); root is.

`probes` are files checked inside the view, as the service user, before the
command starts; the report maps each to "readable", "unreadable" or "missing".
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any


def directives(unit: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, values split on spaces, in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).extend(value.split())
    return found


_PROC_SUBSET = {"all": "", "pid": "subset=pid"}
_PROTECT_PROC = {"default": "", "invisible": "hidepid=invisible",
                 "noaccess": "hidepid=noaccess", "ptraceable": "hidepid=ptraceable"}


def proc_mount(unit: Path) -> str:
    """The mount(8) command that mounts /proc as the unit's ProcSubset= and
    ProtectProc= have it ('' when it leaves /proc as it is)."""
    found = directives(unit)
    options = [option for option in (
        *(_PROC_SUBSET[value] for value in found.get("ProcSubset", [])),
        *(_PROTECT_PROC[value] for value in found.get("ProtectProc", []))) if option]
    return f"mount -t proc -o {','.join(options)} proc /proc" if options else ""


def proc_view(unit: Path) -> list[str]:
    """Command words that run a command in a mount namespace of its own, with /proc
    as the unit mounts it and the rest of the host's view unchanged."""
    mount = proc_mount(unit)
    assert mount, f"{unit.name} leaves /proc as it is"
    return ["unshare", "--mount", "--fork", "sh", "-c", f'{mount} && exec "$@"', "sh"]


def script(unit: Path, command: list[str], *, user: str, group: str, probes: list[Path],
           report: Path, stage: Path, path_map: dict[str, str] | None = None) -> str:
    """The shell script that builds the unit's view and then execs `command` as `user`."""
    def mapped(path: str) -> str:
        for unit_path, real in (path_map or {}).items():
            if path == unit_path or path.startswith(unit_path + "/"):
                return real + path[len(unit_path):]
        return path

    found = directives(unit)
    q = shlex.quote
    lines = ["set -eu", "mount --make-rprivate /", f"mkdir -p {q(str(stage))}"]
    if mount := proc_mount(unit):
        lines.append(mount)
    binds: list[tuple[str, str]] = []
    for n, raw in enumerate(found.get("BindReadOnlyPaths", [])):
        source = mapped(raw.lstrip("-"))
        staged = str(stage / f"bind{n}")
        lines += [f"if [ -e {q(source)} ]; then touch {q(staged)};"
                  f" mount --bind {q(source)} {q(staged)}; fi"]
        binds.append((staged, source))
    for raw in found.get("TemporaryFileSystem", []):
        path, _, options = mapped(raw).partition(":")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {q(path)}")
        for staged, target in binds:
            if target.startswith(path + "/"):
                lines += [f"if [ -e {q(staged)} ]; then touch {q(target)};"
                          f" mount --bind {q(staged)} {q(target)};"
                          f" mount -o remount,bind,ro {q(target)}; fi"]
        if options == "ro":
            lines.append(f"mount -o remount,ro {q(path)}")
    empty = stage / "inaccessible"
    lines += [f": > {q(str(empty))}", f"chmod 000 {q(str(empty))}"]
    for raw in found.get("InaccessiblePaths", []):
        path = mapped(raw.lstrip("-"))
        lines.append(f"if [ -e {q(path)} ]; then mount --bind {q(str(empty))} {q(path)}; fi")
    as_user = f"setpriv --reuid={q(user)} --regid={q(group)} --clear-groups"
    probe = " ".join(q(str(p)) for p in probes)
    lines += [
        f"{as_user} sh -c 'for f in \"$@\"; do if [ ! -e \"$f\" ]; then echo \"$f missing\";"
        f" elif [ -s \"$f\" ] && cat \"$f\" > /dev/null 2>&1; then echo \"$f readable\";"
        f" else echo \"$f unreadable\"; fi; done' probe {probe} > {q(str(report))}",
        f"exec {as_user} {' '.join(q(c) for c in command)}",
    ]
    return "\n".join(lines) + "\n"


def start(unit: Path, command: list[str], *, user: str, group: str, probes: list[Path],
          report: Path, stage: Path, path_map: dict[str, str] | None = None,
          **popen: Any) -> subprocess.Popen[bytes]:
    """Popen of the command in the unit's view (in its own mount namespace)."""
    text = script(unit, command, user=user, group=group, probes=probes, report=report,
                  stage=stage, path_map=path_map)
    return subprocess.Popen(["unshare", "--mount", "sh", "-c", text], **popen)


def read_report(report: Path) -> dict[str, str]:
    """{probed path: "readable" | "unreadable" | "missing"}."""
    lines = report.read_text().splitlines()
    return {path: state for path, state in (line.rsplit(" ", 1) for line in lines)}
