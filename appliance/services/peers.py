"""The peer allowlist: which AEs may talk to the box, from where, and for what.

Stored in `<home>/peers.toml`, edited by `pacs-edge peers add/remove` with
tomlkit so that operator comments survive. A running server re-reads the
file when its modification time or size changes (checked at each new
association), so edits apply without a restart.

An empty allowlist admits nobody: the box is closed until peers are added.
So does an unreadable one in a running server (`fail_closed`: a typo in a
hand-edited peers.toml): it logs the error once per change of the file and
admits no peer until the file reads again, rather than failing every
association with a traceback; `pacs-edge status` warns.

AE titles: one normal form, stripped (PS3.5 6.2: leading and trailing
spaces are not significant; pynetdicom strips the calling AE title too), so a
peer is found by the title it calls with; 1-16 characters of the default
repertoire (`ae_title_problem`), checked by `peers add` and on every load.
Each AE title belongs to one peer: `peers add` refuses a second, and a
hand-edited file holding one twice is refused like any other bad entry (a
server admits no peer until it is fixed), since only one of the two could
ever apply and the other's restrictions would be silently ignored.

Identity at association time (`Peer.refusal`): a peer's AE title is its
name on the wire, not a credential. What binds it to the device:
- `bind_host`: the AE title is accepted only from the addresses of `host`;
- on the TLS port, a client certificate (from `pacs-edge certs issue NAME`)
  names the peer: its common name or a DNS subjectAltName must be the peer's
  NAME, so the certificate of peer A cannot call with peer B's AE title;
- `tls_only`: the peer is refused on the plain port, and on the TLS port
  without a certificate that names it.

Authorization (`Allowlist.authorize`): the one place that decides whether a
calling AE may use a service (store, find, move, get). Services call it with
the caller an edge identified and raise its NotAuthorized; edges only map that
to their protocol's refusal and audit it, so no edge holds its own check.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from appliance.base.config import not_utf8
from appliance.base.durable import atomic_rewrite
from appliance.base.errors import ConfigError, NotAuthorized, PeerError

log = logging.getLogger(__name__)

PERMISSIONS = ("store", "find", "move", "get", "commit", "mpps", "worklist", "hl7")
# A sender of HL7 orders (permission hl7) is known by its host alone; it
# needs no port (the box never calls it), so such a peer may have port 0.
PORTLESS = frozenset({"hl7"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_AE_TITLE_HINT = ("use 1-16 printable ASCII characters without a backslash (leading and"
                  " trailing spaces do not count)")

PEERS_HEADER = """\
# pacs-edge peer allowlist. Edit with `pacs-edge peers add|remove|list`.
# Each [peers.NAME] table is one remote AE: its AE title, where it listens
# (used as the C-MOVE destination), and the services it may use
# (store, find, move, get, commit, mpps, worklist; hl7: may send HL7 orders from
# host). An AE not listed here is rejected at association.
"""


@dataclass(frozen=True)
class Peer:
    name: str
    ae_title: str
    host: str
    port: int
    allow: frozenset[str]
    bind_host: bool = False  # only accept this AE title from `host`'s addresses
    tls: bool = False  # C-MOVE sub-associations to this peer use DICOM TLS
    tls_only: bool = False  # refused unless it calls over TLS with its own certificate

    def __post_init__(self) -> None:
        # The normal form (module docstring): whoever builds a Peer, its title is stripped.
        object.__setattr__(self, "ae_title", self.ae_title.strip())

    @property
    def flags(self) -> list[str]:
        """The identity and transport options that are on, by their peers.toml keys."""
        return [key for key, on in (("bind_host", self.bind_host), ("tls", self.tls),
                                    ("tls_only", self.tls_only)) if on]

    def may(self, permission: str) -> bool:
        return permission in self.allow

    @property
    def callable(self) -> bool:
        """Whether the box can call this peer: it has a port (an hl7-only peer may not)."""
        return self.port > 0

    def accepts_address(self, address: str) -> bool:
        """True unless the peer is bound to its host and `address` is not one of its IPs."""
        if not self.bind_host:
            return True
        return address in _addresses(self.host)

    def refusal(self, *, address: str, over_tls: bool,
                certificate: CertificateIdentity | None) -> str | None:
        """Why this peer may not associate from `address` as it called, or None.

        `certificate` is the verified client certificate of a TLS association
        (None on the plain port, or when mutual TLS is off and none was sent).
        """
        if not self.accepts_address(address):
            return f"AE title is bound to host {self.host!r}, not this address"
        if certificate is not None and not certificate.names(self.name):
            return (f"TLS certificate of {certificate.common_name!r} may not call as peer"
                    f" {self.name!r} (certificate and AE title belong to different peers)")
        if self.tls_only and not over_tls:
            return "peer is TLS-only and called on the plain port"
        if self.tls_only and certificate is None:
            return "peer is TLS-only and presented no client certificate"
        return None


@dataclass(frozen=True)
class CertificateIdentity:
    """The names a verified peer certificate carries (see `Peer.refusal`)."""

    common_name: str
    dns_names: frozenset[str] = frozenset()
    not_after: float = 0.0  # expiry, epoch seconds (for the metrics)

    def names(self, peer_name: str) -> bool:
        # Exact match: peer names are case-sensitive keys of peers.toml.
        return peer_name == self.common_name or peer_name in self.dns_names


def _addresses(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


def parse_permissions(text: str) -> frozenset[str]:
    wanted = {p.strip().lower() for p in text.split(",") if p.strip()}
    unknown = wanted - set(PERMISSIONS)
    if unknown or not wanted:
        raise PeerError(
            f"unknown permission(s) {sorted(unknown) or text!r}",
            hint=f"use a comma-separated subset of {','.join(PERMISSIONS)}",
        )
    return frozenset(wanted)


def ae_title_problem(title: str) -> str | None:
    """What makes `title` (stripped) no AE title, or None: PS3.5 6.2 allows 1-16
    characters of the default repertoire (printable ASCII) but the backslash."""
    if not title:
        return "it is empty"
    if len(title) > 16:
        return f"it has {len(title)} characters, more than 16"
    for position, char in enumerate(title, 1):
        if char == "\\":
            return f"character {position} is a backslash"
        if not " " <= char <= "~":
            kind = "a control character" if char.isascii() else "not ASCII"
            return f"character {position} (U+{ord(char):04X}) is {kind}"
    return None


def validate_peer(peer: Peer) -> None:
    if not _NAME.match(peer.name):
        raise PeerError(f"invalid peer name {peer.name!r}",
                        hint="use 1-64 letters, digits, '.', '_' or '-'")
    problem = ae_title_problem(peer.ae_title)
    if problem is not None:
        raise PeerError(f"invalid AE title {peer.ae_title!r}: {problem}", hint=_AE_TITLE_HINT)
    if not (0 < peer.port <= 65535) and not (peer.port == 0 and peer.allow <= PORTLESS):
        raise PeerError(f"invalid port {peer.port}",
                        hint="use 1-65535 (only an hl7-only peer may leave out its port)")
    if not peer.host.strip():
        raise PeerError("empty host", hint="give the peer's host name or IP address")


class Allowlist:
    """Thread-safe view of peers.toml that reloads itself when the file changes."""

    def __init__(self, path: Path, *, fail_closed: bool = False) -> None:
        """`fail_closed` (a server's): an unreadable file admits no peer (logged);
        otherwise (a command's) its ConfigError is raised to the caller."""
        self.path = path
        self._fail_closed = fail_closed
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._peers: dict[str, Peer] = {}

    def peers(self) -> dict[str, Peer]:
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._peers = _load(self.path) if stamp is not None else {}
                except ConfigError as exc:
                    if not self._fail_closed:
                        raise
                    log.error("peer allowlist cannot be read, admitting no peer until it"
                              " is fixed: %s", exc.message)
                    self._peers = {}
                self._stamp = stamp
            return dict(self._peers)

    def by_ae_title(self, ae_title: str) -> Peer | None:
        title = ae_title.strip()
        return next((p for p in self.peers().values() if p.ae_title == title), None)

    def hl7_sender(self, address: str) -> Peer | None:
        """The peer allowed to send HL7 from `address` (its host resolves to it), or None.
        May resolve host names: call it off the event loop."""
        senders = [p for p in self.peers().values() if p.may("hl7")]
        for peer in senders:
            if peer.host == address:
                return peer
        for peer in senders:
            if address in _addresses(peer.host):
                return peer
        return None

    def authorize(self, ae_title: str, permission: str) -> Peer:
        """The peer calling as `ae_title` if it holds `permission`; else NotAuthorized.

        An AE title not in the allowlist (removed since it associated) is refused
        the same way as a listed peer without the permission.
        """
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}")  # a bug, not a peer's doing
        peer = self.by_ae_title(ae_title)
        if peer is None or not peer.may(permission):
            raise NotAuthorized(permission, ae_title=ae_title.strip())
        return peer

    def ae_titles(self) -> list[str]:
        return sorted({p.ae_title for p in self.peers().values()})

    def add(self, peer: Peer) -> None:
        validate_peer(peer)
        doc = self._document()
        table = doc.setdefault("peers", tomlkit.table(is_super_table=True))
        if peer.name in table:
            raise PeerError(f"peer {peer.name!r} already exists",
                            hint=f"remove it first: pacs-edge peers remove {peer.name}")
        holder = self.by_ae_title(peer.ae_title)
        if holder is not None:
            raise PeerError(
                f"AE title {peer.ae_title!r} already belongs to peer {holder.name!r}: an AE"
                " title names one peer", hint=f"remove that peer first (pacs-edge peers remove"
                f" {holder.name}) or edit its entry in {self.path}")
        entry = tomlkit.table()
        entry["ae_title"] = peer.ae_title
        entry["host"] = peer.host
        entry["port"] = peer.port
        entry["allow"] = sorted(peer.allow)
        if peer.bind_host:
            entry["bind_host"] = True
        if peer.tls:
            entry["tls"] = True
        if peer.tls_only:
            entry["tls_only"] = True
        table[peer.name] = entry
        atomic_rewrite(self.path, tomlkit.dumps(doc).encode())

    def remove(self, name: str) -> str:
        """Remove peer `name`; returns its AE title as the file gave it. Works on a file
        that does not load as a whole (a title twice, one bad entry): taking the bad
        entry out is how the operator repairs it, and serve then admits peers again."""
        doc = self._document()
        table = doc.get("peers")
        if not isinstance(table, dict) or name not in table:
            raise PeerError(f"no peer named {name!r}", hint="see `pacs-edge peers list`")
        entry = table[name]
        ae_title = str(entry.get("ae_title", "")).strip() if isinstance(entry, dict) else ""
        del table[name]
        atomic_rewrite(self.path, tomlkit.dumps(doc).encode())
        return ae_title

    def _document(self) -> tomlkit.TOMLDocument:
        if not self.path.exists():
            return tomlkit.parse(PEERS_HEADER)
        try:
            return tomlkit.parse(_read(self.path))
        except TOMLKitError as exc:
            raise ConfigError(str(self.path), "<file>", f"valid TOML ({exc})") from exc

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)


def _read(path: Path) -> str:
    """The text of peers.toml; ConfigError naming the file when it is a folder, a pipe or
    another file that is not a regular one (never opened: a FIFO would block), or not
    UTF-8 text."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        error = ConfigError(str(path), f"<{what}>", "a TOML text file (the peer allowlist)")
        error.hint = (f"move {path} away (without it no peer is admitted) and add peers"
                      " with `pacs-edge peers add`")
        raise error
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc


def _load(path: Path) -> dict[str, Peer]:
    try:
        raw = tomllib.loads(_read(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.not_toml(str(path), str(exc)) from exc
    table = raw.get("peers", {})
    if not isinstance(table, dict):  # [[peers]], an array of tables, or `peers = ...`
        shape = "[[peers]], an array of tables" if isinstance(table, list) else (
            f"a {type(table).__name__}")
        error = ConfigError("peers", shape, "one [peers.NAME] table per peer", source=str(path))
        error.hint = ("write each peer as a table named after it ([peers.ct1], not"
                      " [[peers]]), or add them with `pacs-edge peers add`")
        raise error
    peers: dict[str, Peer] = {}
    for name, entry in table.items():
        key = f"peers.{name}"
        try:
            peer = Peer(
                name=name,
                ae_title=str(entry["ae_title"]),
                host=str(entry["host"]),
                port=int(entry.get("port", 0)),
                allow=frozenset(str(p) for p in entry.get("allow", [])),
                bind_host=bool(entry.get("bind_host", False)),
                tls=bool(entry.get("tls", False)),
                tls_only=bool(entry.get("tls_only", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(key, entry, "a table with ae_title, host, port and allow",
                              source=str(path)) from exc
        unknown = peer.allow - set(PERMISSIONS)
        if unknown:
            raise ConfigError(f"{key}.allow", sorted(peer.allow),
                              f"a subset of {list(PERMISSIONS)}", source=str(path))
        problem = ae_title_problem(peer.ae_title)
        if problem is not None:
            raise ConfigError(f"{key}.ae_title", peer.ae_title,
                              f"an AE title ({problem})", source=str(path))
        holder = next((p for p in peers.values() if p.ae_title == peer.ae_title), None)
        if holder is not None:
            error = ConfigError(f"{key}.ae_title", peer.ae_title,
                                f"an AE title no other peer has (peers.{holder.name} has it)",
                                source=str(path))
            error.hint = (f"an AE title names one peer: delete peers.{holder.name} or"
                          f" peers.{name} from {path}, or give one its own AE title")
            raise error
        peers[name] = peer
    return peers
