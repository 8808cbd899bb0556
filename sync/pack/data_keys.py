"""Data keys and their wrapping: for the site (AES-GCM) and for readers (X25519).

Each pack has its own random data key. It is never stored in the clear: it is
wrapped once per recipient into a small key object, a blob of its own next
to the pack. Granting a reader a pack later is one new key object (148
bytes); the pack and manifest are never re-uploaded. Revoking deletes the
reader's key objects (what the reader already downloaded stays theirs).

Key object layouts (all integers are bytes, no length fields: sizes are fixed)::

    site   (92 bytes)  b"PEKEY01" | 0x01 | pack_id (16) | site_key_id (8)
                       | nonce (12) | AES-256-GCM(site_key, nonce, data_key, aad) (48)
           aad = b"PEKEY01" | pack_id | b"site"
           site_key_id = HMAC-SHA256(site_key, b"pacs-edge site key id v1")[:8]

    reader (148 bytes) b"PEKEY01" | 0x02 | pack_id (16) | reader_public (32)
                       | ephemeral_public (32) | nonce (12)
                       | AES-256-GCM(k, nonce, data_key, aad) (48)
           shared = X25519(ephemeral_private, reader_public)
           k = HKDF-SHA256(ikm=shared, salt=none, info=b"pacs-edge reader wrap v1" | pack_id, 32)
           aad = b"PEKEY01" | pack_id | b"reader" | reader_public | ephemeral_public

The site key id is not secret and not authenticated: it only lets a failed
unwrap say "wrapped for another site key" instead of "tampered".

A reader's public key travels as text: "pacs-edge-reader-v1:" followed by
base64url (no padding) of the 32 key bytes and a 4-byte check
(SHA-256 of the prefix and key), so a mistyped key is refused instead of
silently granting access to a key nobody holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sync.pack.blob_format import KEY_OBJECT
from sync.pack.naming import reader_id
from sync.pack.pack_errors import PackFormatError, PackIntegrityError, WrongKeyError
from sync.pack.segments import KEY_SIZE, PACK_ID_SIZE, check_data_key, check_pack_id

KEY_MAGIC = KEY_OBJECT.magic
KIND_SITE = 0x01
KIND_READER = 0x02
READER_KEY_PREFIX = "pacs-edge-reader-v1:"
READER_WRAP_INFO = b"pacs-edge reader wrap v1"
SITE_KEY_ID_INFO = b"pacs-edge site key id v1"

_NONCE = 12
_WRAPPED = KEY_SIZE + 16
_PUBLIC = 32
_CHECK = 4
_HEAD = len(KEY_MAGIC) + 1 + PACK_ID_SIZE
SITE_OBJECT_SIZE = _HEAD + 8 + _NONCE + _WRAPPED
READER_OBJECT_SIZE = _HEAD + 2 * _PUBLIC + _NONCE + _WRAPPED


def new_data_key() -> bytes:
    """A fresh 256-bit data key: one per pack, never reused."""
    return os.urandom(KEY_SIZE)


def new_pack_id() -> bytes:
    """A fresh random 16-byte pack id (binds segments, manifest and key objects)."""
    return os.urandom(PACK_ID_SIZE)


def site_key_id(site_key: bytes) -> str:
    """A short public fingerprint of the site key (hex); says which key wrapped what."""
    _check_site_key(site_key)
    return hmac.new(site_key, SITE_KEY_ID_INFO, hashlib.sha256).digest()[:8].hex()


@dataclass(frozen=True)
class KeyObject:
    """A parsed key object (still wrapped)."""

    kind: int  # KIND_SITE or KIND_READER
    pack_id: bytes
    site_key_id: bytes | None  # site objects
    reader_public: bytes | None  # reader objects
    ephemeral_public: bytes | None
    nonce: bytes
    wrapped: bytes


def parse_key_object(blob: bytes) -> KeyObject:
    """Split a key object into its fields. A newer format's magic is a PackFormatError;
    another magic, or a kind and size this format does not define, a PackIntegrityError
    (blob_format)."""
    blob = bytes(blob)
    KEY_OBJECT.check_magic(blob)
    if len(blob) < _HEAD:
        raise KEY_OBJECT.damaged(f"it has {len(blob)} bytes")
    kind = blob[len(KEY_MAGIC)]
    pack_id = blob[len(KEY_MAGIC) + 1:_HEAD]
    rest = blob[_HEAD:]
    if kind == KIND_SITE and len(blob) == SITE_OBJECT_SIZE:
        return KeyObject(kind, pack_id, rest[:8], None, None, rest[8:8 + _NONCE],
                         rest[8 + _NONCE:])
    if kind == KIND_READER and len(blob) == READER_OBJECT_SIZE:
        eph_end = 2 * _PUBLIC
        return KeyObject(kind, pack_id, None, rest[:_PUBLIC], rest[_PUBLIC:eph_end],
                         rest[eph_end:eph_end + _NONCE], rest[eph_end + _NONCE:])
    raise KEY_OBJECT.damaged(f"kind {kind} with {len(blob)} bytes is none it defines")


# --- site ---------------------------------------------------------------------


def wrap_for_site(site_key: bytes, pack_id: bytes, data_key: bytes) -> bytes:
    """The site key object for one pack's data key."""
    _check_site_key(site_key)
    check_pack_id(pack_id)
    check_data_key(data_key)
    nonce = os.urandom(_NONCE)
    wrapped = AESGCM(site_key).encrypt(nonce, data_key, _site_aad(pack_id))
    key_id = bytes.fromhex(site_key_id(site_key))
    return KEY_MAGIC + bytes([KIND_SITE]) + pack_id + key_id + nonce + wrapped


def unwrap_with_site(site_key: bytes, pack_id: bytes, blob: bytes) -> bytes:
    """The data key of pack `pack_id` from its site key object."""
    _check_site_key(site_key)
    obj = _expect(blob, KIND_SITE, pack_id)
    try:
        return AESGCM(site_key).decrypt(obj.nonce, obj.wrapped, _site_aad(pack_id))
    except InvalidTag:
        mine = site_key_id(site_key)
        assert obj.site_key_id is not None
        if obj.site_key_id.hex() != mine:
            raise WrongKeyError(
                f"key object was wrapped with site key {obj.site_key_id.hex()}, "
                f"this site key is {mine}",
                hint="use the site key this cloud container was written with "
                "(recover it from the escrow file)") from None
        raise PackIntegrityError("site key object failed authentication") from None


def _site_aad(pack_id: bytes) -> bytes:
    return KEY_MAGIC + pack_id + b"site"


def _check_site_key(site_key: bytes) -> None:
    if not isinstance(site_key, bytes) or len(site_key) != KEY_SIZE:
        raise ValueError(f"a site key is {KEY_SIZE} bytes")


# --- readers ------------------------------------------------------------------


def reader_public_key(private_key: X25519PrivateKey | bytes) -> bytes:
    """The 32 raw public key bytes of a reader's private key."""
    return _private(private_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def wrap_for_reader(public_key: bytes, pack_id: bytes, data_key: bytes) -> bytes:
    """A reader key object: only the holder of `public_key`'s private key unwraps it."""
    check_pack_id(pack_id)
    check_data_key(data_key)
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC:
        raise ValueError("a reader public key is 32 bytes")
    ephemeral = X25519PrivateKey.generate()
    eph_public = reader_public_key(ephemeral)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError as exc:  # low-order point: no shared secret
        raise PackFormatError("reader public key is not a usable X25519 key",
                              hint="ask the reader for the key printed by "
                              "`pacs-edge reader init`") from exc
    nonce = os.urandom(_NONCE)
    wrapped = AESGCM(_reader_kek(shared, pack_id)).encrypt(
        nonce, data_key, _reader_aad(pack_id, public_key, eph_public))
    return KEY_MAGIC + bytes([KIND_READER]) + pack_id + public_key + eph_public + nonce \
        + wrapped


def unwrap_with_reader(private_key: X25519PrivateKey | bytes, pack_id: bytes,
                       blob: bytes) -> bytes:
    """The data key of pack `pack_id` from a reader key object, with the reader's key."""
    private = _private(private_key)
    obj = _expect(blob, KIND_READER, pack_id)
    assert obj.reader_public is not None and obj.ephemeral_public is not None
    mine = reader_public_key(private)
    if not hmac.compare_digest(obj.reader_public, mine):
        raise WrongKeyError(f"key object is for reader {reader_id(obj.reader_public)}, "
                            f"this key is reader {reader_id(mine)}",
                            hint="this reader was not granted the study")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(obj.ephemeral_public))
        kek = _reader_kek(shared, pack_id)
        return AESGCM(kek).decrypt(obj.nonce, obj.wrapped,
                                   _reader_aad(pack_id, mine, obj.ephemeral_public))
    except (InvalidTag, ValueError):
        raise PackIntegrityError("reader key object failed authentication") from None


def _reader_kek(shared: bytes, pack_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                info=READER_WRAP_INFO + pack_id).derive(shared)


def _reader_aad(pack_id: bytes, reader_public: bytes, ephemeral_public: bytes) -> bytes:
    return KEY_MAGIC + pack_id + b"reader" + reader_public + ephemeral_public


def _private(private_key: X25519PrivateKey | bytes) -> X25519PrivateKey:
    if isinstance(private_key, X25519PrivateKey):
        return private_key
    if not isinstance(private_key, bytes) or len(private_key) != 32:
        raise ValueError("a reader private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(private_key)


def _expect(blob: bytes, kind: int, pack_id: bytes) -> KeyObject:
    check_pack_id(pack_id)
    obj = parse_key_object(blob)
    if obj.kind != kind:  # the blob's name says which kind it is
        raise KEY_OBJECT.damaged("it is of the wrong kind "
                                 f"({'site' if obj.kind == KIND_SITE else 'reader'})")
    if obj.pack_id != pack_id:
        raise PackIntegrityError("key object belongs to another pack (pack_id differs)")
    return obj


# --- reader public keys as text -------------------------------------------------


def format_reader_public_key(public_key: bytes) -> str:
    """The copy-pasteable text form of a reader's public key (68 characters)."""
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC:
        raise ValueError("a reader public key is 32 bytes")
    body = public_key + _key_check(public_key)
    return READER_KEY_PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def parse_reader_public_key(text: str) -> bytes:
    """The 32 key bytes from the text form; PackFormatError says what is wrong."""
    hint = "paste the whole last line printed by `pacs-edge reader init`"
    text = "".join(text.split())  # tolerate line wraps from e-mail and terminals
    if not text.startswith(READER_KEY_PREFIX):
        raise PackFormatError(f"a reader key starts with {READER_KEY_PREFIX!r}", hint=hint)
    encoded = text[len(READER_KEY_PREFIX):]
    try:
        body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except ValueError as exc:
        raise PackFormatError("reader key is not valid base64url", hint=hint) from exc
    if len(body) != _PUBLIC + _CHECK or base64.urlsafe_b64encode(body).decode().rstrip(
            "=") != encoded:
        raise PackFormatError("reader key has the wrong length", hint=hint)
    public_key, check = body[:_PUBLIC], body[_PUBLIC:]
    if not hmac.compare_digest(check, _key_check(public_key)):
        raise PackFormatError("reader key check digits do not match (mistyped?)", hint=hint)
    return public_key


def _key_check(public_key: bytes) -> bytes:
    return hashlib.sha256(READER_KEY_PREFIX.encode("ascii") + public_key).digest()[:_CHECK]
