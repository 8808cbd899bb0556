"""The allowlist: edits keep comments, a running reader sees changes without restart."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import EdgeServer, run_pacs_edge

from appliance.base.errors import ConfigError, NotAuthorized, PeerError
from appliance.dimse.handlers import DimseHandlers
from appliance.services.peers import (
    PEERS_HEADER,
    Allowlist,
    CertificateIdentity,
    Peer,
    parse_permissions,
)


def _peer(name: str = "ct1", title: str = "CT1") -> Peer:
    return Peer(name, title, "10.0.0.5", 104, frozenset({"store"}))


def test_added_peer_is_seen_by_an_existing_reader(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(PEERS_HEADER + "# site note: keep this\n")
    reader = Allowlist(path)
    assert reader.peers() == {}
    Allowlist(path).add(_peer())
    assert reader.by_ae_title("CT1") == _peer()
    assert "# site note: keep this" in path.read_text()
    Allowlist(path).remove("ct1")
    assert reader.by_ae_title("CT1") is None


def test_edits_keep_the_files_owner_and_mode(tmp_path: Path) -> None:
    """The Ansible role makes peers.toml the service user's with 0640: `peers add` made
    it 0644 (and, run by another user, that user's)."""
    path = tmp_path / "peers.toml"
    path.write_text(PEERS_HEADER)
    os.chown(path, 65534, 65534)
    path.chmod(0o640)
    Allowlist(path).add(_peer())
    Allowlist(path).remove("ct1")
    Allowlist(path).add(_peer("ct2", "CT2"))
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 65534, 65534)
    assert Allowlist(path).by_ae_title("CT2") == _peer("ct2", "CT2")


def test_peers_remove_repairs_an_allowlist_that_holds_a_title_twice(edge_home: Path) -> None:
    """A peers.toml an older version wrote with one AE title twice admits no peer after
    the upgrade (fail closed); `peers remove` refused too, so only a hand edit fixed it."""
    peers = edge_home / "peers.toml"
    peers.write_text(PEERS_HEADER + '[peers.ws1]\nae_title = "WS1"\nhost = "127.0.0.1"\n'
                     'port = 11113\nallow = ["find"]\n\n[peers.ws1b]\nae_title = "WS1"\n'
                     'host = "127.0.0.2"\nport = 11113\nallow = ["find"]\n')
    with pytest.raises(ConfigError, match="an AE title no other peer has"):
        Allowlist(peers).peers()
    removed = run_pacs_edge("peers", "remove", "ws1b", "--home", str(edge_home))
    assert "removed peer ws1b (WS1)" in removed.stdout
    assert "warning" not in removed.stderr
    assert {n: p.ae_title for n, p in Allowlist(peers).peers().items()} == {"ws1": "WS1"}


def test_peers_remove_says_when_the_allowlist_is_still_bad(edge_home: Path) -> None:
    peers = edge_home / "peers.toml"
    entries = [("bad", "BAD ONE TOO LONG TITLE"), ("other", "OTHER")]
    peers.write_text(PEERS_HEADER + "".join(
        f'[peers.{name}]\nae_title = "{title}"\nhost = "h"\nport = 1\nallow = ["find"]\n\n'
        for name, title in entries))
    removed = run_pacs_edge("peers", "remove", "other", "--home", str(edge_home))
    assert "removed peer other (OTHER)" in removed.stdout
    assert "warning: the allowlist still cannot be read" in removed.stderr
    assert "peers.bad.ae_title" in removed.stderr


def test_duplicate_and_unknown_names_are_explained(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    with pytest.raises(PeerError, match="already exists"):
        allowlist.add(_peer())
    with pytest.raises(PeerError, match="no peer named"):
        allowlist.remove("ghost")


def test_authorize_returns_the_calling_peer_when_it_holds_the_permission(
        tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    assert allowlist.authorize("CT1  ", "store") == _peer()


@pytest.mark.parametrize(("ae_title", "permission"), [("CT1", "find"), ("GHOST", "store")])
def test_authorize_refuses_a_missing_permission_or_an_unlisted_ae_with_its_fields(
        tmp_path: Path, ae_title: str, permission: str) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    with pytest.raises(NotAuthorized) as caught:
        allowlist.authorize(ae_title, permission)
    assert (caught.value.ae_title, caught.value.permission) == (ae_title, permission)
    assert caught.value.message == f"peer lacks permission {permission!r}"
    assert f"--allow {permission}" in (caught.value.hint or "")


@pytest.mark.parametrize("text", ["", "store,delete", "everything"])
def test_unknown_permissions_are_refused(text: str) -> None:
    with pytest.raises(PeerError):
        parse_permissions(text)


def test_permissions_parse_case_and_spaces() -> None:
    assert parse_permissions(" Store, FIND ") == frozenset({"store", "find"})


@pytest.mark.parametrize(
    "peer",
    [
        Peer("bad name", "CT1", "h", 104, frozenset({"store"})),
        Peer("ct", "A" * 17, "h", 104, frozenset({"store"})),
        Peer("ct", "CT", "h", 0, frozenset({"store"})),
        Peer("ct", "CT", " ", 104, frozenset({"store"})),
    ],
)
def test_invalid_peers_are_refused(tmp_path: Path, peer: Peer) -> None:
    with pytest.raises(PeerError):
        Allowlist(tmp_path / "peers.toml").add(peer)


def _write_peers(path: Path, *titles: str) -> None:
    """A hand-written peers.toml: peer pN with the AE title titles[N] (a JSON string is a
    TOML basic string)."""
    path.write_text(PEERS_HEADER + "".join(
        f'[peers.p{n}]\nae_title = {json.dumps(title)}\nhost = "10.0.0.{n}"\nport = 104\n'
        f'allow = ["find"]\n' for n, title in enumerate(titles)), encoding="utf-8")


def test_ae_titles_are_stripped_on_add_and_on_load(tmp_path: Path) -> None:
    """PS3.5 6.2: leading and trailing spaces of an AE title are not significant, and
    pynetdicom admits " SPC1 " calling as SPC1: the peer must be found by that title,
    or none of its restrictions applied."""
    added = Allowlist(tmp_path / "added.toml")
    added.add(Peer("sp", " SPC1 ", "10.9.9.9", 11116, frozenset({"find"}), bind_host=True))
    added.add(Peer("long", "A" * 16 + " ", "10.9.9.8", 104, frozenset({"find"})))
    assert 'ae_title = "SPC1"' in added.path.read_text()
    hand = tmp_path / "hand.toml"
    _write_peers(hand, " WS1 ")
    for allowlist, title in ((Allowlist(added.path), "SPC1"), (Allowlist(hand), "WS1")):
        peer = allowlist.by_ae_title(title)
        assert peer is not None and peer.ae_title == title
        assert title in allowlist.ae_titles()


@pytest.mark.parametrize(("title", "problem"), [
    ("   ", "it is empty"),
    ("A" * 17, "it has 17 characters, more than 16"),
    ("CT\\1", "character 3 is a backslash"),
    ("CT\t1", "character 3 (U+0009) is a control character"),
    ("CT\u00e91", "character 3 (U+00E9) is not ASCII"),
])
def test_an_invalid_ae_title_is_refused_naming_what_is_wrong(
        tmp_path: Path, title: str, problem: str) -> None:
    with pytest.raises(PeerError, match=re.escape(problem)):
        Allowlist(tmp_path / "peers.toml").add(Peer("ct", title, "h", 104, frozenset({"store"})))
    hand = tmp_path / "hand.toml"
    _write_peers(hand, "OK1", title)
    with pytest.raises(ConfigError) as caught:
        Allowlist(hand).peers()
    assert "peers.p1.ae_title" in caught.value.message and problem in caught.value.message


def test_an_ae_title_another_peer_has_is_refused_naming_that_peer(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(Peer("ws1", "WS1", "10.0.0.40", 11113, frozenset({"find", "move"})))
    tighter = Peer("ws1-tls", " WS1", "10.0.0.40", 11113, frozenset({"find"}), tls_only=True)
    with pytest.raises(PeerError, match="AE title 'WS1' already belongs to peer 'ws1'") as caught:
        allowlist.add(tighter)
    assert "pacs-edge peers remove ws1" in (caught.value.hint or "")
    assert list(allowlist.peers()) == ["ws1"]


def test_a_hand_edited_duplicate_ae_title_admits_neither_peer(tmp_path: Path) -> None:
    """Only one of two peers with one AE title could apply, the other's restrictions
    silently ignored: the file is refused like any bad entry, and a server admits no
    peer until it is fixed."""
    path = tmp_path / "peers.toml"
    _write_peers(path, "WS1", "CT1", "WS1 ")
    with pytest.raises(ConfigError) as caught:
        Allowlist(path).peers()
    assert "peers.p2.ae_title" in caught.value.message
    assert "peers.p0 has it" in caught.value.message
    assert "delete peers.p0 or peers.p2" in (caught.value.hint or "")
    serving = Allowlist(path, fail_closed=True)
    assert serving.peers() == {} and serving.by_ae_title("WS1") is None


class _Rejects:
    """What a DIMSE handler does to a requested association, as a fake records it."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, int]] = []
        self.audited: list[str] = []

    def send_reject(self, result: int, source: int, diagnostic: int) -> None:
        self.sent.append((result, source, diagnostic))

    def association(self, assoc: Any, *, accepted: bool, reason: str = "") -> None:
        self.audited.append(reason)


def test_a_calling_ae_that_maps_to_no_peer_is_rejected_not_accepted_unrestricted(
        tmp_path: Path) -> None:
    """Defence in depth: pynetdicom's calling-AE check and the allowlist once disagreed
    on " SPC1 " (the association was accepted without the peer's restrictions); a
    caller the handler finds no peer for is rejected as an unknown calling AE."""
    Allowlist(tmp_path / "peers.toml").add(_peer())
    rejects = _Rejects()
    requestor = SimpleNamespace(primitive=SimpleNamespace(calling_ae_title="SPC1"),
                                address="127.0.0.1", ae_title="")
    assoc = SimpleNamespace(requestor=requestor, acse=rejects)
    services: Any = SimpleNamespace(allowlist=Allowlist(tmp_path / "peers.toml"),
                                    audit=rejects)
    DimseHandlers(services).on_requested(SimpleNamespace(assoc=assoc))
    assert rejects.sent == [(0x01, 0x01, 0x03)]  # permanent, calling AE not recognised
    assert rejects.audited == ["calling AE title is not in the allowlist (pacs-edge peers add)"]
    assert requestor.ae_title == "SPC1"  # the audit record names the caller


def test_a_spaced_ae_title_keeps_its_peers_restrictions_and_is_not_taken_twice(
        refusing_edge_server: EdgeServer) -> None:
    """The audit's reproduction: a peer added as " SPC1 ", bound to another host and
    TLS-only, called as SPC1 on the plain port from here; then the same AE title
    added again under another name."""
    server = refusing_edge_server
    server.cli("peers", "add", "sp", "--ae-title", " SPC1 ", "--host", "10.9.9.9", "--port",
               "11116", "--allow", "store", "--bind-host", "--tls-only")
    try:
        assert not server.echo(aet="SPC1").ok
        server.wait_for_log("calling=SPC1 address=127.0.0.1 reason=AE title is bound to host"
                            " '10.9.9.9'")
        again = server.cli("peers", "add", "sp2", "--ae-title", "SPC1", "--host", "127.0.0.1",
                           "--port", "11116", "--allow", "store", check=False)
        assert again.returncode == 2, again.stdout + again.stderr
        assert "AE title 'SPC1' already belongs to peer 'sp'" in again.stderr
        assert "pacs-edge peers remove sp" in again.stderr
        assert not server.echo(aet="SPC1").ok
    finally:
        server.cli("peers", "remove", "sp")


def test_tls_only_and_other_flags_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    peer = Peer("ws2", "WS2", "127.0.0.1", 104, frozenset({"find"}), bind_host=True, tls=True,
                tls_only=True)
    Allowlist(path).add(peer)
    assert Allowlist(path).by_ae_title("WS2") == peer
    assert "tls_only = true" in path.read_text()


_CT1 = CertificateIdentity("ct1")


@pytest.mark.parametrize(
    ("tls_only", "over_tls", "certificate", "refused"),
    [
        (False, False, None, None),  # plain port, no certificate: the AE title (and host)
        (False, True, None, None),  # TLS without mutual authentication
        (False, True, _CT1, None),  # its own certificate
        (False, True, CertificateIdentity("box", frozenset({"ct1"})), None),  # a DNS SAN
        (False, True, CertificateIdentity("CT1"), "may not call as peer 'ct1'"),  # exact
        (False, True, CertificateIdentity("ws1"), "may not call as peer 'ct1'"),
        (True, False, None, "called on the plain port"),
        (True, True, None, "presented no client certificate"),
        (True, True, _CT1, None),
        (True, True, CertificateIdentity("ws1"), "may not call as peer 'ct1'"),
    ],
)
def test_refusal_binds_certificate_transport_and_peer(
    tls_only: bool, over_tls: bool, certificate: CertificateIdentity | None,
    refused: str | None,
) -> None:
    peer = Peer("ct1", "CT1", "127.0.0.1", 104, frozenset({"store"}), tls_only=tls_only)
    why = peer.refusal(address="127.0.0.1", over_tls=over_tls, certificate=certificate)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_hl7_sender_needs_no_port_but_a_dicom_peer_does(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(Peer("ris", "RIS", "127.0.0.1", 0, frozenset({"hl7"})))
    with pytest.raises(PeerError, match="invalid port 0"):
        allowlist.add(Peer("ct", "CT", "127.0.0.1", 0, frozenset({"store", "hl7"})))
    assert Allowlist(tmp_path / "peers.toml").peers()["ris"].port == 0


def test_hl7_sender_is_found_by_host_and_only_with_permission_hl7(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(Peer("ct", "CT", "127.0.0.3", 104, frozenset({"store"})))
    allowlist.add(Peer("ris", "RIS", "localhost", 0, frozenset({"hl7"})))
    sender = allowlist.hl7_sender("127.0.0.1")  # localhost resolves to it
    assert sender is not None and sender.name == "ris"
    assert allowlist.hl7_sender("127.0.0.3") is None  # a DICOM peer may not send HL7
    assert allowlist.hl7_sender("127.0.0.2") is None


def _break(path: Path, how: str) -> None:
    if how == "not-utf8":
        path.write_bytes(PEERS_HEADER.encode() + b"# caf\xe9\n")
    elif how == "duplicate":
        with path.open("a", encoding="utf-8") as peers:
            peers.write("".join(f'[peers.{name}]\nae_title = "{title}"\nhost = "10.0.0.40"\n'
                                'port = 104\nallow = ["find"]\n'
                                for name, title in (("ws1", "WS1"), ("ws1-tls", " WS1"))))
    elif how == "array-of-tables":  # TOML's [[peers]] for [peers.NAME]: an easy slip
        path.write_text(PEERS_HEADER + '[[peers]]\nae_title = "CT1"\nhost = "10.0.0.41"\n'
                        'port = 104\nallow = ["store"]\n', encoding="utf-8")
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
        os.mkfifo(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how, why", [("not-utf8", "is not UTF-8"), ("folder", "<a folder>"),
                                      ("fifo", "<not a regular file>"),
                                      ("duplicate", "peers.ws1 has it"),
                                      ("array-of-tables", "[[peers]], an array of tables")])
def test_unreadable_peers_file_is_one_error_naming_it(tmp_path: Path, how: str,
                                                      why: str) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    _break(home / "peers.toml", how)
    # A FIFO would block the read: the timeouts turn a hang into a failure.
    listed = run_pacs_edge("peers", "list", "--home", str(home), check=False, timeout=60)
    lines = listed.stderr.strip().splitlines()
    assert listed.returncode == 2, listed.stdout + listed.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: "), listed.stderr
    assert lines[0].startswith("error: ") and "peers.toml" in lines[0] and why in lines[0]
    checked = run_pacs_edge("config", "check", "--home", str(home), check=False, timeout=60)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    assert any(line.startswith("error  peer allowlist: ") and "peers.toml" in line
               and why in line for line in checked.stderr.splitlines()), checked.stderr
    with pytest.raises(ConfigError) as caught:
        Allowlist(home / "peers.toml").peers()
    assert "peers.toml" in caught.value.message and why in caught.value.message
