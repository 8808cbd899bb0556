"""Data-key wrapping for the site and for readers, reader key text, and the site
secret files (provisioning.site_secrets). Pure unit tests with real cryptography."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisioning import site_secrets as secret_files
from sync.pack import naming
from sync.pack.data_keys import (
    READER_OBJECT_SIZE,
    SITE_OBJECT_SIZE,
    format_reader_public_key,
    new_data_key,
    new_pack_id,
    parse_key_object,
    parse_reader_public_key,
    reader_public_key,
    site_key_id,
    unwrap_with_reader,
    unwrap_with_site,
    wrap_for_reader,
    wrap_for_site,
)
from sync.pack.pack_errors import PackFormatError, PackIntegrityError, WrongKeyError

# --- site wrap ------------------------------------------------------------------


def test_site_wrap_round_trip():
    site_key, pack_id, data_key = os.urandom(32), new_pack_id(), new_data_key()
    blob = wrap_for_site(site_key, pack_id, data_key)
    assert len(blob) == SITE_OBJECT_SIZE == 92
    assert data_key not in blob
    assert unwrap_with_site(site_key, pack_id, blob) == data_key
    assert parse_key_object(blob).site_key_id == bytes.fromhex(site_key_id(site_key))


def test_wrong_site_key_is_named_as_such():
    pack_id = new_pack_id()
    blob = wrap_for_site(os.urandom(32), pack_id, new_data_key())
    with pytest.raises(WrongKeyError, match="wrapped with site key") as caught:
        unwrap_with_site(os.urandom(32), pack_id, blob)
    assert "escrow" in (caught.value.hint or "")


def test_site_key_object_tampered_or_of_another_pack_fails():
    site_key, pack_id = os.urandom(32), new_pack_id()
    blob = bytearray(wrap_for_site(site_key, pack_id, new_data_key()))
    blob[-1] ^= 0x01
    with pytest.raises(PackIntegrityError):
        unwrap_with_site(site_key, pack_id, bytes(blob))
    other = wrap_for_site(site_key, new_pack_id(), new_data_key())
    with pytest.raises(PackIntegrityError, match="another pack"):
        unwrap_with_site(site_key, pack_id, other)
    # relabelled with this pack's id: the AAD still binds the original one
    relabelled = other[:8] + pack_id + other[24:]
    with pytest.raises(PackIntegrityError):
        unwrap_with_site(site_key, pack_id, relabelled)


# --- reader wrap ----------------------------------------------------------------


def test_reader_wrap_round_trip_with_key_object_or_raw_bytes():
    private = X25519PrivateKey.generate()
    public = reader_public_key(private)
    pack_id, data_key = new_pack_id(), new_data_key()
    blob = wrap_for_reader(public, pack_id, data_key)
    assert len(blob) == READER_OBJECT_SIZE == 148
    assert unwrap_with_reader(private, pack_id, blob) == data_key
    raw = os.urandom(32)  # any 32 bytes are an X25519 private key
    blob = wrap_for_reader(reader_public_key(raw), pack_id, data_key)
    assert unwrap_with_reader(raw, pack_id, blob) == data_key
    # two wraps of the same key differ (fresh ephemeral key and nonce)
    assert wrap_for_reader(public, pack_id, data_key) != wrap_for_reader(public, pack_id,
                                                                         data_key)


def test_wrong_reader_key_cannot_unwrap():
    granted, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pack_id = new_pack_id()
    blob = wrap_for_reader(reader_public_key(granted), pack_id, new_data_key())
    with pytest.raises(WrongKeyError, match="for reader"):
        unwrap_with_reader(other, pack_id, blob)
    # pretending to be the granted reader (its public key written over) still fails
    forged = blob[:24] + reader_public_key(other) + blob[56:]
    with pytest.raises(PackIntegrityError):
        unwrap_with_reader(other, pack_id, forged)


def test_reader_key_object_tampered_or_swapped_between_packs_fails():
    private = X25519PrivateKey.generate()
    pack_a, pack_b = new_pack_id(), new_pack_id()
    blob = wrap_for_reader(reader_public_key(private), pack_a, new_data_key())
    for position in (60, 80, -1):  # ephemeral key, nonce, tag
        bad = bytearray(blob)
        bad[position] ^= 0x01
        with pytest.raises(PackIntegrityError):
            unwrap_with_reader(private, pack_a, bytes(bad))
    with pytest.raises(PackIntegrityError, match="another pack"):
        unwrap_with_reader(private, pack_b, blob)
    with pytest.raises(PackIntegrityError):
        unwrap_with_reader(private, pack_b, blob[:8] + pack_b + blob[24:])


def test_a_site_object_is_not_a_reader_object():
    """Format 01 fixes kind and size: a blob named as the other kind, or of no kind it
    defines, is damage; a key object of a newer format asks for an upgrade."""
    pack_id = new_pack_id()
    site_blob = wrap_for_site(os.urandom(32), pack_id, new_data_key())
    with pytest.raises(PackIntegrityError, match="wrong kind"):
        unwrap_with_reader(os.urandom(32), pack_id, site_blob)
    with pytest.raises(PackIntegrityError, match="modified or damaged"):
        parse_key_object(b"PEKEY01\x03" + bytes(100))
    with pytest.raises(PackIntegrityError, match="modified or damaged"):
        parse_key_object(site_blob[:-1])
    with pytest.raises(PackFormatError, match=r"format 02.*upgrade"):
        parse_key_object(b"PEKEY02" + site_blob[7:])


# --- reader public key text -----------------------------------------------------


def test_reader_public_key_text_round_trips_and_names_the_reader():
    public = reader_public_key(X25519PrivateKey.generate())
    text = format_reader_public_key(public)
    assert text.startswith("pacs-edge-reader-v1:") and len(text) == 68
    assert all(c.isalnum() or c in "-_:" for c in text)
    assert parse_reader_public_key(text) == public
    assert parse_reader_public_key(f"  {text[:30]}\n{text[30:]}  \n") == public
    assert len(naming.reader_id(public)) == 16


def test_mistyped_reader_public_key_is_refused():
    text = format_reader_public_key(reader_public_key(X25519PrivateKey.generate()))
    typo = text[:40] + ("A" if text[40] != "A" else "B") + text[41:]
    with pytest.raises(PackFormatError, match="check digits"):
        parse_reader_public_key(typo)
    with pytest.raises(PackFormatError, match="starts with"):
        parse_reader_public_key(text.replace("v1", "v2"))
    with pytest.raises(PackFormatError, match="length"):
        parse_reader_public_key(text[:-4])


def test_low_order_reader_public_key_is_refused():
    with pytest.raises(PackFormatError, match="X25519"):
        wrap_for_reader(bytes(32), new_pack_id(), new_data_key())


# --- site secret files ----------------------------------------------------------


def test_site_secrets_are_created_0600_and_never_overwritten(tmp_path: Path):
    home = tmp_path / "home"
    old_umask = os.umask(0)  # even a permissive umask yields 0600
    try:
        created = secret_files.create_site_secrets(home)
    finally:
        os.umask(old_umask)
    folder = home / "secrets"
    assert created == [folder / "site.key", folder / "names.key"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in created:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_bytes()) == 32
    site, names = secret_files.load_site_key(home), secret_files.load_name_secret(home)
    assert site != names
    assert secret_files.create_site_secrets(home) == []
    assert secret_files.load_site_key(home) == site
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp left


def test_secret_file_readable_by_others_is_refused_with_a_hint(tmp_path: Path):
    secret_files.create_site_secrets(tmp_path)
    path = tmp_path / "secrets" / "site.key"
    path.chmod(0o644)
    with pytest.raises(secret_files.KeyFileError, match="0644") as caught:
        secret_files.load_site_key(tmp_path)
    assert f"chmod 600 {path}" in caught.value.hint
    path.chmod(0o640)
    with pytest.raises(secret_files.KeyFileError):
        secret_files.load_site_key(tmp_path)
    path.chmod(0o400)
    assert len(secret_files.load_site_key(tmp_path)) == 32


def test_missing_or_malformed_secret_file_is_refused(tmp_path: Path):
    with pytest.raises(secret_files.KeyFileError, match="missing") as caught:
        secret_files.load_site_key(tmp_path)
    assert "pacs-edge init" in caught.value.hint
    (tmp_path / "secrets").mkdir(mode=0o700)
    short = tmp_path / "secrets" / "names.key"
    secret_files.create_secret_file(short, b"x" * 31)
    with pytest.raises(secret_files.KeyFileError, match="31 bytes"):
        secret_files.load_name_secret(tmp_path)
    assert secret_files.create_secret_file(short, b"y" * 32) is False
    assert short.read_bytes() == b"x" * 31


def test_reader_key_is_a_usable_x25519_private_key(tmp_path: Path):
    assert secret_files.create_reader_key(tmp_path) is True
    assert secret_files.create_reader_key(tmp_path) is False
    raw = secret_files.load_reader_key(tmp_path)
    pack_id, data_key = new_pack_id(), new_data_key()
    blob = wrap_for_reader(reader_public_key(raw), pack_id, data_key)
    assert unwrap_with_reader(raw, pack_id, blob) == data_key


def test_provisioning_keys_import_only_the_base_floor():
    code = ("import sys, provisioning.site_secrets; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('appliance', 'sync') "
            "and m not in ('appliance', 'appliance.base') "
            "and not m.startswith('appliance.base.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
