"""Key escrow: the site secrets in one passphrase-encrypted file, and back into a new home.

What the file holds (all from `<home>/secrets/`): the site key (`site.key`,
wraps every pack's data key), the name secret (`names.key`, names the blobs),
the audit log key (`log.key`) and, from version 2 on, the audit anchor key
(`audit.key`, the HMAC key of the log's cloud anchors; made here if the box
never anchored yet). With them and the cloud container a new box rebuilds its
index (`pacs-edge restore`) and can still authenticate the old box's anchors.
The site CA and node certificate are not in it: a new box gets new ones at
`init`.

File format (UTF-8 JSON, one object)::

    {"format": "pacs-edge-escrow", "version": 2,
     "site_key_id": "<16 hex>",                       public fingerprint, for the label
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<b64, 16 bytes>"},
     "nonce": "<b64, 12 bytes>",
     "ciphertext": "<b64>"}

    key        = scrypt(passphrase UTF-8, salt, n, r, p, length 32)
    ciphertext = AES-256-GCM(key, nonce, JSON {"site.key": b64, "names.key": b64,
                                               "log.key": b64, "audit.key": b64}, aad)
    aad        = b"pacs-edge-escrow v2|" | site_key_id ASCII

Version 1 (written before the anchor key was escrowed) is the same without
"audit.key" and with aad b"pacs-edge-escrow v1|"; it is still read, and
recovering from it leaves `audit.key` to be made anew (the old anchors then no
longer authenticate: escrow again to get a version 2 file).

A wrong passphrase and a modified file both fail the GCM tag: they cannot be
told apart, and the error says so. The KDF parameters are read from the file
(bounded, so a crafted file cannot ask for gigabytes of memory).

Escrow holds the current site key. During a rotation that is the new key (the
old one waits as `site.key.<id>`), so escrow is allowed then: a rotation keeps
the old key's wraps until the new key is escrowed (sync.rotate), and the next
`keys rotate` retires it. Refused only while `site.key.next` is left by a
rotation killed before the new key became current: `site.key` is about to be
replaced. Recovering never overwrites a secret file.
Both record the escrowed key id in the home (provisioning.escrow_state), which
eviction waits for.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from provisioning.escrow_state import record_escrow
from provisioning.home import AUDIT_KEY, LOG_KEY
from provisioning.keyring import publish_current_key_id
from provisioning.provisioning_errors import EscrowError
from provisioning.site_key_id import key_id, publish_key_id
from provisioning.site_secrets import (
    KEY_BYTES,
    NAMES_KEY,
    SITE_KEY,
    create_secret_file,
    load_secret_file,
    secrets_dir,
)

FORMAT = "pacs-edge-escrow"
VERSION = 2
# The secret files each format version holds, in the order they are written back.
SECRET_FILES = {1: (SITE_KEY, NAMES_KEY, LOG_KEY), 2: (SITE_KEY, NAMES_KEY, LOG_KEY, AUDIT_KEY)}
MIN_PASSPHRASE = 12
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1  # 128 MiB, about half a second
_MAX_N = 1 << 20
# scrypt needs 128 * n * r bytes and time in proportion to n * r * p. Each bound alone
# let a crafted file ask for 4 GiB (n = 2^20, r = 32) and 16 times that work: 4 times
# what this writer uses in memory (128 MiB) and 8 times in work.
_MAX_N_R = 1 << 22  # 512 MiB
_MAX_N_R_P = 1 << 23


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise EscrowError(f"the passphrase has {len(passphrase)} characters; at least "
                          f"{MIN_PASSPHRASE} are needed",
                          hint="use a long passphrase (several words) and keep it apart "
                          "from the escrow file")


def read_passphrase_file(path: Path) -> str:
    """The passphrase in `path` (one line; the trailing newline is not part of it)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EscrowError(f"{path}: cannot read the passphrase file ({exc})",
                          hint="name a readable UTF-8 text file") from exc
    return text.rstrip("\r\n")


def export_escrow(home: Path, out: Path, passphrase: str) -> str:
    """Write the escrow file `out` (0600, never overwritten); returns the site key id."""
    check_passphrase(passphrase)
    if (secrets_dir(home) / f"{SITE_KEY}.next").exists():
        raise EscrowError("a site key rotation was interrupted before its new key became "
                          "current", hint="run `pacs-edge keys rotate` to resume it, then "
                          "escrow the new key")
    # The anchor key is made on first use; escrow it even before the first anchor
    # (create never replaces a key the agent made meanwhile).
    create_secret_file(secrets_dir(home) / AUDIT_KEY, os.urandom(KEY_BYTES))
    secrets = {name: load_secret_file(secrets_dir(home) / name)
               for name in SECRET_FILES[VERSION]}
    kid = key_id(secrets[SITE_KEY])
    salt, nonce = os.urandom(16), os.urandom(12)
    payload = json.dumps({name: _b64(data) for name, data in secrets.items()}).encode()
    key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    document = {
        "format": FORMAT, "version": VERSION, "site_key_id": kid,
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                "salt": _b64(salt)},
        "nonce": _b64(nonce),
        "ciphertext": _b64(AESGCM(key).encrypt(nonce, payload, _aad(VERSION, kid))),
    }
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise EscrowError(f"{out} exists", hint="choose a new file name; escrow files are "
                          "never overwritten")
    if not create_secret_file(out, (json.dumps(document, indent=1) + "\n").encode()):
        raise EscrowError(f"{out} exists", hint="choose a new file name")
    record_escrow(home, kid, how="escrow")
    publish_current_key_id(home)  # a box older than the public id record gets it here
    return kid


def open_escrow(path: Path, passphrase: str) -> dict[str, bytes]:
    """The secrets in an escrow file of any version: {file name: 32 bytes}."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EscrowError(f"{path}: not a readable escrow file ({exc})",
                          hint="name the file written by `pacs-edge keys escrow`") from exc
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting
        raise EscrowError(f"{path}: not a readable escrow file ({type(exc).__name__})",
                          hint="name the file written by `pacs-edge keys escrow`") from exc
    try:
        version = document["version"]
        if (document["format"] != FORMAT or not _is_int(version)
                or version not in SECRET_FILES):
            raise EscrowError(f"{path}: not a pacs-edge escrow file of version "
                              f"{' or '.join(map(str, SECRET_FILES))}",
                              hint="name the file written by `pacs-edge keys escrow`; a "
                              "newer pacs-edge may have written it")
        kdf = document["kdf"]
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        # Integers only (not 1e400, 8.5, "8" or true), in range, n a power of two.
        if kdf["name"] != "scrypt" or not (
                _is_int(n) and _is_int(r) and _is_int(p) and 2 <= n <= _MAX_N
                and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16
                and n * r <= _MAX_N_R and n * r * p <= _MAX_N_R_P):
            raise EscrowError(f"{path}: unsupported or oversized key derivation parameters",
                              hint="the file was not written by pacs-edge, or was edited")
        kid = str(document["site_key_id"])
        key = _derive(passphrase, _unb64(kdf["salt"]), n, r, p)
        payload = AESGCM(key).decrypt(_unb64(document["nonce"]),
                                      _unb64(document["ciphertext"]), _aad(version, kid))
        secrets = {name: _unb64(value) for name, value in json.loads(payload).items()}
    except InvalidTag:
        raise EscrowError(f"{path}: the passphrase is wrong or the file was modified",
                          hint="check the passphrase (and the passphrase file's content); "
                          "a modified escrow file cannot be opened") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise EscrowError(f"{path}: the escrow file is damaged ({type(exc).__name__})",
                          hint="use another copy of the escrow file") from exc
    if set(secrets) != set(SECRET_FILES[version]) or any(len(v) != KEY_BYTES
                                                         for v in secrets.values()):
        raise EscrowError(f"{path}: the escrow file does not hold the expected secrets",
                          hint="use another copy of the escrow file")
    if key_id(secrets[SITE_KEY]) != kid:
        raise EscrowError(f"{path}: the site key does not match its fingerprint",
                          hint="use another copy of the escrow file")
    return secrets


def recover_escrow(path: Path, home: Path, passphrase: str) -> list[Path]:
    """Write the escrowed secrets into `home/secrets/` (0600); refuse if any exists.

    Returns the files written: a version 1 escrow has no `audit.key`."""
    secrets = open_escrow(path, passphrase)
    folder = secrets_dir(home)
    existing = [folder / name for name in secrets if (folder / name).exists()]
    if existing:
        raise EscrowError(f"{existing[0]} exists: refusing to overwrite a secret",
                          hint="recover into a new, empty data home, before `pacs-edge init`")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(stat.S_IRWXU)
    publish_key_id(home, key_id(secrets[SITE_KEY]))  # named before it is the key
    written = []
    for name in secrets:
        if not create_secret_file(folder / name, secrets[name]):
            raise EscrowError(f"{folder / name} appeared meanwhile: refusing to overwrite",
                              hint="recover into a new, empty data home")
        written.append(folder / name)
    record_escrow(home, key_id(secrets[SITE_KEY]), how="recover")
    return written


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true is a bool, an int to isinstance


def _aad(version: int, kid: str) -> bytes:
    return f"pacs-edge-escrow v{version}|{kid}".encode("ascii")


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    return base64.b64decode(str(value), validate=True)
