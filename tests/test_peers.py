"""The allowlist: edits keep comments, a running reader sees changes without restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import PeerError
from appliance.peers import PEERS_HEADER, Allowlist, Peer, parse_permissions


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


def test_duplicate_and_unknown_names_are_explained(tmp_path: Path) -> None:
    allowlist = Allowlist(tmp_path / "peers.toml")
    allowlist.add(_peer())
    with pytest.raises(PeerError, match="already exists"):
        allowlist.add(_peer())
    with pytest.raises(PeerError, match="no peer named"):
        allowlist.remove("ghost")


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
