"""Is the current site key escrowed? The record `keys escrow` leaves in the data home.

Evicting a study leaves its cloud copy as the only copy, and that copy opens
only with the site key. If the box dies before anyone exported the key
(`pacs-edge keys escrow`), every evicted study is lost with it. So eviction
asks this module first (sync.escrow_gate), and `status` and `config check`
warn while the answer is no.

`<home>/escrow.json` (0640, one JSON object, replaced atomically by each
escrow; it holds no secret, only the public key id)::

    {"site_key_id": "<16 hex>", "escrowed_at": "<UTC ISO 8601>", "how": "escrow"}

`keys escrow` writes it once the escrow file is durable; `keys recover`
writes it too, with "how": "recover" (the recovered key is in the escrow file
it came from). The record names a key id, so a key rotation (`keys rotate`)
makes it stale by itself: the new current key is not the escrowed one, and
eviction waits for a new escrow. A record that cannot be read counts as no
escrow: refusing an eviction is the safe side.

Which key is current comes from the keyring. serve cannot read it (its unit
hides `site.key`, docs/security.md "Privilege split"), so its health report
asks with `published_id=True`: the key's public id record
(provisioning.site_key_id) stands in for the key when the keyring cannot be
read. That record may run ahead of the key after a crash, never behind, so it
can only delay an "escrowed". The eviction gate never passes the flag: it
compares the key itself. Whoever reads the keyring here also repairs the
record (a box upgraded from before it existed gets it at the agent's next
pass, or the next `status` or `config check`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.base.durable import write_file
from provisioning.keyring import load_keyring, publish_current_key_id
from provisioning.provisioning_errors import ProvisioningError
from provisioning.site_key_id import published_key_id, record_path

RECORD_FILE = "escrow.json"
ESCROW_HINT = ("run `pacs-edge keys escrow --out FILE` and keep the file offline; a lab that "
               "accepts the risk sets [sync] evict_without_escrow = true (or passes "
               "`evict --without-escrow`)")


@dataclass(frozen=True)
class EscrowStatus:
    """The current site key id against the escrow record (None: no usable record)."""

    current_key_id: str | None
    escrowed_key_id: str | None = None
    escrowed_at: str | None = None
    error: str | None = None  # the site key itself could not be read

    @property
    def ok(self) -> bool:
        return self.current_key_id is not None and self.escrowed_key_id == self.current_key_id

    @property
    def problem(self) -> str | None:
        """One line for the operator; None when the current key is escrowed. No secrets."""
        if self.error is not None:
            return f"cannot tell whether the site key is escrowed: {self.error}"
        if self.escrowed_key_id is None:
            return ("the site key was never escrowed: if this box is lost, evicted studies "
                    "cannot be decrypted from the cloud")
        if not self.ok:
            return (f"the escrow of {self.escrowed_at} holds site key {self.escrowed_key_id}, "
                    f"but the current site key is {self.current_key_id} (rotated since): "
                    "a new escrow is needed")
        return None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "site_key_id": self.current_key_id,
                "escrowed_key_id": self.escrowed_key_id, "escrowed_at": self.escrowed_at,
                "problem": self.problem}


def record_escrow(home: Path, key_id: str, *, how: str) -> None:
    """Record that site key `key_id` is escrowed now (`how`: "escrow" or "recover")."""
    document = {"site_key_id": key_id, "how": how,
                "escrowed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_file(Path(home) / RECORD_FILE, (json.dumps(document) + "\n").encode(), 0o640,
               replace=True)


def escrow_status(home: Path, *, published_id: bool = False) -> EscrowStatus:
    """Compare the current site key with the record; never raises for a missing or bad one.

    With `published_id`, for a process that may not read the site key (serve),
    the key's public id record answers when the keyring cannot be read."""
    try:
        current = load_keyring(home).current_id
    except ProvisioningError as exc:
        public = published_key_id(home) if published_id else None
        if public is None:
            return EscrowStatus(None, error=exc.message + (
                f"; nor does {record_path(home)} name it (the sync agent's next pass, "
                "`pacs-edge status` or `pacs-edge init` writes it)" if published_id else ""))
        current = public
    else:
        if published_key_id(home) != current:
            publish_current_key_id(home)
    try:
        document = json.loads((Path(home) / RECORD_FILE).read_text(encoding="utf-8"))
        return EscrowStatus(current, str(document["site_key_id"]), str(document["escrowed_at"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return EscrowStatus(current)
