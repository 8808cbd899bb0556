"""A blob of the cloud copy edited outside its AEAD-protected bytes is reported as tampering.

The magic, kind and reserved fields of packs, manifests and site key objects
come before (or beside) what AES-GCM authenticates. An edit there made
`pacs-edge recall` say "not in a format this version of pacs-edge reads;
upgrade", with no security alert in the audit log, though the index records
these blobs as written and verified by this very box.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, run_pacs_edge
from syncagent import evict, sync_once

pytestmark = pytest.mark.slow  # replicates, evicts and recalls a real study


def _flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda blob: blob[:offset] + bytes([blob[offset] ^ 1]) + blob[offset + 1:]


DAMAGE = {  # blob name suffix, edit: each outside the bytes AES-GCM authenticates
    "pack magic": (".pack", _flip(0)),
    "pack reserved field": (".pack", _flip(31)),
    "manifest magic": (".manifest", _flip(0)),
    "site key object magic": (".keys/site", _flip(0)),
    "site key object kind": (".keys/site", _flip(7)),
}


def _security_alerts(home: Path) -> int:
    """Audit records of a cloud blob that failed authentication (110113 with PE001)."""
    count = 0
    for line in (home / "audit" / "audit.log").read_text().splitlines():
        event = json.loads(line)["record"]["EventIdentification"]
        codes = {c["csd-code"] for c in event.get("EventTypeCode", ())}
        count += event["EventID"]["csd-code"] == "110113" and "PE001" in codes
    return count


def test_an_edited_header_of_a_pack_manifest_or_key_object_is_reported_as_tampering(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    study = dicomgen.make_study(tmp_path / "study", seed=941)
    run_pacs_edge("import", "--home", str(home), *(str(i.path) for i in study))
    assert "replicated 1 study version" in sync_once(home).stdout
    uid = study[0].study_uid
    evict(home, uid)
    for what, (suffix, edit) in DAMAGE.items():
        blob, = (p for p in (home / "cloud" / "studies").rglob("*")
                 if str(p).endswith(suffix) and not p.name.startswith("."))
        original = blob.read_bytes()
        blob.write_bytes(edit(original))
        alerts = _security_alerts(home)
        result = run_pacs_edge("recall", uid, "--home", str(home), check=False)
        blob.write_bytes(original)
        said = result.stdout + result.stderr
        assert result.returncode == 2, (what, said)
        assert "modified" in said and "do not trust it" in said, (what, said)
        assert "upgrade" not in said and "Traceback" not in said, (what, said)
        assert _security_alerts(home) == alerts + 1, what
    assert "recalled 6 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
