"""Operator records name the person logged in, not only the account the command ran as.

A deployed box is run as its service user (`runuser -u pacs-edge -- pacs-edge ...`),
which sets LOGNAME and USER to that account. The kernel's login uid survives the
switch: these tests give a real `pacs-edge` command a login uid the way pam_loginuid
does, by writing /proc/self/loginuid in the shell that then execs it (an unset
loginuid may be set once, without privilege), and read the records it wrote.
The tests run as root, so the account is root's name and the login user is
another: `nobody` (65534), or a uid with no passwd entry.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI_TIMEOUT, init_home, pacs_edge_command, run_pacs_edge

from appliance.audit import operators
from appliance.audit.log import AuditLog, Entry
from appliance.audit.syslog import format_message
from provisioning.site_key_id import published_key_id

NOBODY = 65534
REFUSED = 97  # the shell's exit code when the kernel refuses to set the login uid


def run_logged_in_as(loginuid: int | None, *args: str,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`pacs-edge ARGS` in a process whose login uid is `loginuid` (None: left as is)."""
    command = [*pacs_edge_command(), *args]
    if loginuid is not None:
        command = ["sh", "-c", f'echo "$1" > /proc/self/loginuid || exit {REFUSED}; shift;'
                   ' exec "$@"', "sh", str(loginuid), *command]
    base = {k: v for k, v in os.environ.items()
            if k not in ("PACS_EDGE_HOME", "SUDO_USER", "SUDO_UID")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL, env={**base, **(env or {})})
    if loginuid is not None and proc.returncode == REFUSED:
        pytest.skip(f"this kernel refuses to set the login uid: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def last_record(home: Path) -> dict[str, Any]:
    lines = (home / "audit" / "audit.log").read_text().splitlines()
    record: dict[str, Any] = json.loads(lines[-1])["record"]
    return record


def operators_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's participants but the box itself (its UserName is `pacs-edge cli`)."""
    return [p for p in record["ActiveParticipant"] if p.get("UserName") != "pacs-edge cli"]


def uid_without_passwd_entry() -> int:
    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def add_peer(home: Path, loginuid: int | None, name: str = "ws1",
             env: dict[str, str] | None = None) -> dict[str, Any]:
    run_logged_in_as(loginuid, "peers", "add", name, "--home", str(home), "--ae-title",
                     name.upper(), "--host", "127.0.0.1", "--port", "104", "--allow", "find",
                     env=env)
    record = last_record(home)
    assert record["EventIdentification"]["EventID"]["csd-code"] == "110113"
    return record


def test_a_command_run_as_the_service_account_names_the_login_user_as_requestor(
        edge_home: Path) -> None:
    record = add_peer(edge_home, NOBODY)
    assert operators_of(record) == [
        {"UserID": "nobody", "AlternativeUserID": str(NOBODY),
         "UserName": "login user (loginuid)", "UserIsRequestor": True},
        {"UserID": getpass.getuser(), "UserIsRequestor": False},
    ]


def test_the_login_user_reaches_verify_the_export_and_the_syslog_message(
        edge_home: Path) -> None:
    add_peer(edge_home, NOBODY)
    run_pacs_edge("audit", "verify", "--home", str(edge_home))
    xml = run_pacs_edge("audit", "export", "--format", "dicom-xml", "--home",
                        str(edge_home)).stdout
    people = [p.attrib for p in ET.fromstring(xml).iter("ActiveParticipant")
              if p.get("UserID") == "nobody"]
    assert people == [{"UserID": "nobody", "UserIsRequestor": "true",
                       "AlternativeUserID": str(NOBODY), "UserName": "login user (loginuid)"}]
    entries = [Entry.parse(line) for _n, _end, line in AuditLog.for_home(edge_home).entries()]
    message = format_message(entries[-2], "edge", 1)  # the peer's record; then the export's
    assert b'UserID="nobody" UserIsRequestor="true" AlternativeUserID="65534"' in message


def test_a_login_uid_without_a_passwd_entry_is_recorded_as_its_number(
        edge_home: Path) -> None:
    uid = uid_without_passwd_entry()
    run_logged_in_as(uid, "audit", "export", "--home", str(edge_home))
    record = last_record(edge_home)
    assert record["EventIdentification"]["EventID"]["csd-code"] == "110101"
    assert [(p["UserID"], p.get("AlternativeUserID"), p["UserIsRequestor"])
            for p in operators_of(record)] == [(str(uid), str(uid), True),
                                               (getpass.getuser(), None, False)]


def test_a_login_user_who_is_the_account_leaves_the_record_as_it_was(edge_home: Path) -> None:
    record = add_peer(edge_home, os.getuid())
    assert operators_of(record) == [{"UserID": getpass.getuser(), "UserIsRequestor": True}]


def test_sudo_user_names_the_person_only_while_the_login_uid_is_unset(edge_home: Path) -> None:
    if operators._loginuid() is not None:
        pytest.skip("this test process has a login uid: its children cannot unset it")
    sudo = {"SUDO_USER": "alice", "SUDO_UID": "4243"}
    record = add_peer(edge_home, None, "ws1", env=sudo)
    assert operators_of(record)[0] == {
        "UserID": "alice", "AlternativeUserID": "4243",
        "UserName": "login user (SUDO_USER, not verified)", "UserIsRequestor": True}
    record = add_peer(edge_home, NOBODY, "ws2", env=sudo)
    assert operators_of(record)[0]["UserID"] == "nobody"



def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_key_recovery_is_a_security_record_naming_the_key_and_a_failed_one_why(
        edge_home: Path, tmp_path: Path) -> None:
    """`keys recover` puts a lost box's site key into a new home and left no audit
    record, nor did a failed try (a wrong passphrase). Now both are Security Alerts
    (Security Configuration) in the new home's trail, naming the operator and the
    escrow file; the recovered key by its id, a failure with outcome 4 and why."""
    passphrase = secret_file(tmp_path / "passphrase", "correct horse battery staple")
    escrow = tmp_path / "site.escrow"
    run_pacs_edge("keys", "escrow", "--home", str(edge_home), "--out", str(escrow),
                  "--passphrase-file", str(passphrase))
    new_home = tmp_path / "new-home"
    wrong = secret_file(tmp_path / "wrong", "not the passphrase at all")
    refused = run_pacs_edge("keys", "recover", "--home", str(new_home), "--from", str(escrow),
                            "--passphrase-file", str(wrong), check=False)
    assert refused.returncode == 2 and "passphrase is wrong" in refused.stderr
    failed = last_record(new_home)
    event = failed["EventIdentification"]
    assert (event["EventID"]["csd-code"], event["EventOutcomeIndicator"]) == ("110113", 4)
    assert [t["csd-code"] for t in event["EventTypeCode"]] == ["110129"]
    assert "the passphrase is wrong" in event["EventOutcomeDescription"]
    assert [o["ParticipantObjectID"] for o in failed["ParticipantObjectIdentification"]] == [
        f"site key recovery from escrow file {escrow}"]
    assert operators_of(failed)[0]["UserID"] == getpass.getuser()

    run_logged_in_as(NOBODY, "keys", "recover", "--home", str(new_home), "--from",
                     str(escrow), "--passphrase-file", str(passphrase))
    recovered = last_record(new_home)
    assert recovered["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert [o["ParticipantObjectID"] for o in recovered["ParticipantObjectIdentification"]
            ] == [f"site key {published_key_id(edge_home)} recovered from escrow file {escrow}"]
    assert operators_of(recovered)[0]["UserID"] == "nobody"
    init_home(new_home)  # the operator guide's next step, on the trail the recovery began
    assert "audit log intact" in run_pacs_edge("audit", "verify", "--home",
                                               str(new_home)).stdout


@pytest.mark.parametrize("content", [None, "", "not a number\n", f"{operators.UNSET}\n"])
def test_a_missing_garbled_or_unset_loginuid_names_no_login_user(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None) -> None:
    """The cases a real process cannot be put in here (no /proc entry, a kernel without
    audit support): a file in /proc's place stands in for it."""
    path = tmp_path / "loginuid"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(operators, "LOGINUID", path)
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert operators.login_user() is None
    assert [p.user_id for p in operators.operators()] == [operators.account_name()]
