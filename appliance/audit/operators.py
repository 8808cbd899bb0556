"""Who ran a command: the person logged in, beside the account it ran as (PS3.15 A.5.2).

On a deployed box the data home belongs to the service user, so operators run
every command as that user (`runuser -u pacs-edge -- pacs-edge ...`, `sudo -u
pacs-edge ...`). Both set LOGNAME and USER to the target user, so the account
alone (getpass.getuser()) names the service user for every operator, and the
trail could not say which person rotated a key or added a peer.

Where the person comes from, strongest first:
- /proc/self/loginuid: set by pam_loginuid at login, inherited by every child
  and kept across su, sudo and runuser; a process cannot change it once set
  without CAP_AUDIT_CONTROL. Unset (4294967295) in processes that never went
  through a login: systemd services, `docker exec`, hosts without pam_loginuid.
- SUDO_USER (with SUDO_UID), only when loginuid is unset or missing: in a
  container, or on a host without pam_loginuid, it is the only trace of who ran
  `sudo -u pacs-edge`. It is an environment variable that anyone running the
  command can set, so the record says it was not verified.

An operator event then has two ActiveParticipants: the person as the
requestor (UserIsRequestor true; UserID the login name, or the uid when it has
no passwd entry; AlternativeUserID the uid, which names outlive; UserName how
the person is known) and the account exactly as before but UserIsRequestor
false. Both carry the event's roles: they act together, the person through the
account. When the person is the account, or cannot be known, the record is the
one participant it always was, which is what serve and the sync agent (loginuid
unset under systemd) keep recording.

Nothing here fails or waits: an unreadable or unset loginuid falls through to
SUDO_USER and then to "unknown", and a uid with no passwd entry is recorded as
its number. One passwd lookup per operator record; the login already resolved
the same name, so a network name service answers it from its cache.
"""

from __future__ import annotations

import getpass
import os
import pwd
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.audit.records import Code, Participant

LOGINUID = Path("/proc/self/loginuid")
UNSET = 4294967295  # (uid_t)-1: no login set it
MAX_NAME = 64  # an environment variable is bounded like any other input


@dataclass(frozen=True)
class LoginUser:
    """The person behind this process, when it is not the account the process runs as."""

    name: str  # passwd name, or the uid as text when it has none
    uid: str  # "" when not known (SUDO_USER without a numeric SUDO_UID)
    source: str  # "loginuid" or "SUDO_USER, not verified"


def operators(*, roles: tuple[Code, ...] = (), user_name: str = "") -> tuple[Participant, ...]:
    """The ActiveParticipants of an operator event: (person, account) or (account,)."""
    account = Participant(account_name(), requestor=True, roles=roles, user_name=user_name)
    person = login_user()
    if person is None:
        return (account,)
    return (Participant(person.name, requestor=True, roles=roles, alternative_user_id=person.uid,
                        user_name=f"login user ({person.source})"),
            replace(account, requestor=False))


def account_name() -> str:
    """The account this process runs as, as the operator's environment names it."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def login_user() -> LoginUser | None:
    """The person logged in, when known and not this process's account; else None."""
    uid = _loginuid()
    if uid is not None:
        return None if uid == os.getuid() else LoginUser(_name_of(uid), str(uid), "loginuid")
    return _sudo_user()


def _loginuid() -> int | None:
    """The kernel's login uid; None when unset or unreadable (no audit support, no /proc)."""
    try:
        uid = int(LOGINUID.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    return None if uid == UNSET or uid < 0 else uid


def _sudo_user() -> LoginUser | None:
    name = _clean(os.environ.get("SUDO_USER", ""))
    raw_uid = os.environ.get("SUDO_UID", "")
    uid = raw_uid if raw_uid.isascii() and raw_uid.isdigit() else ""
    if not name or name == account_name() or (uid and int(uid) == os.getuid()):
        return None
    return LoginUser(name, uid, "SUDO_USER, not verified")


def _name_of(uid: int) -> str:
    try:
        return _clean(pwd.getpwuid(uid).pw_name) or str(uid)
    except (KeyError, OverflowError, OSError):
        return str(uid)


def _clean(text: str) -> str:
    """Printable characters only (an XML attribute and a syslog line carry it), bounded."""
    return "".join(c for c in text if c.isprintable())[:MAX_NAME]
