"""docs/deployment.md, "Upgrading by hand": its pip commands, run as written, put the new
wheel's code into the venv, even when the new wheel has the version of the installed one.

Every build of pacs-edge is `version = "0.1.0"` (pyproject.toml) unless a release bumps
it, and `pip install WHEEL` of the version already installed changes nothing ("pacs-edge
is already installed with the same version as the provided wheel"): the box went on
running the old code after an "upgrade" (found by an upgrade audit from 7c535d4). The
Ansible role installs with --force-reinstall when the wheel changed, for the same reason.

The test runs the block's pip lines with the real pip of a new venv, made from this
interpreter, on two wheels named as `pip wheel` names the product's (pacs_edge,
pyproject.toml's version): the installed one and the upgrade, which differ in one
module's text only. They are made here (a wheel is a zip with its dist-info) and have no
dependencies, so pip needs no index (PIP_NO_INDEX).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "docs" / "deployment.md"
VENV = "/opt/pacs-edge/venv"
NEW_WHEEL = "dist/pacs_edge-NEW.whl"
MARKER = "pacs_edge_build_marker"


def _version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, version: str, build: str) -> Path:
    """pacs_edge-VERSION-py3-none-any.whl holding one module that names `build`."""
    info = f"pacs_edge-{version}.dist-info"
    files = {
        f"{MARKER}.py": f"BUILD = {build!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: pacs-edge\nVersion: {version}\n"
                            .encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_upgrade_by_hand\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(name, data) for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True)
    wheel = folder / f"pacs_edge-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def upgrade_pip_commands() -> list[str]:
    """The pip lines of the first shell block under "### Upgrading by hand"."""
    text = DEPLOYMENT.read_text(encoding="utf-8")
    section = text[text.index("### Upgrading by hand"):]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "no shell block under 'Upgrading by hand'"
    lines = [line.split("#", 1)[0].strip() for line in block[1].splitlines()]
    pip = [line for line in lines if line.startswith(f"{VENV}/bin/pip ")]
    assert pip and all(NEW_WHEEL in line for line in pip), pip
    return pip


def installed_build(venv: Path) -> str:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c",
                           f"import {MARKER}; print({MARKER}.BUILD)"],
                          capture_output=True, text=True, timeout=60, check=True, cwd="/")
    return proc.stdout.strip()


def test_the_documented_upgrade_installs_a_new_wheel_of_the_installed_version(
        tmp_path: Path) -> None:
    version = _version()
    installed = make_wheel(tmp_path / "installed", version, "installed")
    upgrade = make_wheel(tmp_path / "dist", version, "upgrade")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(installed)],
                   check=True, timeout=300, env=env)
    assert installed_build(venv) == "installed"

    for line in upgrade_pip_commands():
        args = [str(upgrade) if word == NEW_WHEEL else word.replace(VENV, str(venv))
                for word in shlex.split(line)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}{proc.stderr}"
    assert installed_build(venv) == "upgrade"
