"""An operator's changes to the peer allowlist, each written to the audit log
(Security Alert, User Security Attributes Changed) once the file has it."""

from __future__ import annotations

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.services.peers import Allowlist, Peer


def add_peer(config: Config, peer: Peer, *, process: str) -> None:
    """Allow `peer` (refused if its name or AE title is taken); `process` names the
    program the audit record says made the change."""
    Allowlist(config.peers_path).add(peer)
    with Auditor.for_home(config, process=process) as auditor:
        auditor.peer_changed("add", name=peer.name, ae_title=peer.ae_title, host=peer.host,
                             port=peer.port, allow=peer.allow, flags=peer.flags)


def remove_peer(config: Config, name: str, *, process: str) -> str:
    """Remove the peer `name`; returns its AE title."""
    ae_title = Allowlist(config.peers_path).remove(name)
    with Auditor.for_home(config, process=process) as auditor:
        auditor.peer_changed("remove", name=name, ae_title=ae_title)
    return ae_title
