"""The site's own small PKI: a site id, a site CA, the node certificate, client certificates.

Files, all created by `pacs-edge init` and never overwritten by it::

    <home>/site-id             random id of this site (text), named in certificate subjects
    <home>/secrets/ca.key      site CA private key (EC P-256, PKCS#8 PEM, 0600)
    <home>/tls/ca.pem          site CA certificate (self-signed)
    <home>/secrets/node.key    this box's private key (EC P-256, PKCS#8 PEM, 0600)
    <home>/tls/node.pem        this box's certificate, signed by the site CA

Every certificate is X.509 v3, ECDSA with SHA-256, with a random 159-bit
serial and a validity that starts five minutes early (clock skew):

- the CA: basicConstraints CA:true, pathlen 0 (it signs end entities only),
  keyUsage keyCertSign + cRLSign; 10 years by default;
- the node: the host name, the fully qualified name, `localhost`, the host's
  addresses (as resolved for its names) and 127.0.0.1/::1 as subjectAltNames,
  plus any the operator adds; extendedKeyUsage serverAuth + clientAuth (the
  box also calls out, for C-MOVE); one year by default;
- a client (a modality or workstation, for DICOM TLS mutual authentication):
  its name as the common name, extendedKeyUsage clientAuth; one year. The box
  binds the name to the peer of the same name (docs/security.md);
- a server (`server=True`: a workstation that is a TLS C-MOVE destination):
  as a client, plus serverAuth (TLS clients, the box included, refuse a
  server certificate without it) and the subjectAltNames the operator gives.

`renew_node` re-issues the node certificate from the same CA (keeping the node
key unless asked for a new one) and reports what changed. Files are written
to a temporary name, fsynced, then linked (create) or renamed (replace) into
place, so a crash leaves the old or the new file, never half of one. Should a
crash fall between replacing the node key and its certificate, the next
`renew_node` sees the mismatch and issues a certificate for the key on disk.

This module imports only the base floor (appliance.base); failures raise
CertificateError.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import socket
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.base.durable import write_file
from provisioning.provisioning_errors import CertificateError
from provisioning.site_secrets import SECRETS_DIR, create_secret_file

SITE_ID_FILE = "site-id"
TLS_DIR = "tls"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
NODE_KEY = "node.key"
NODE_CERT = "node.pem"
ORGANIZATION = "pacs-edge"
EARLIEST_CLOCK = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)  # see _check_clock
DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 365
DEFAULT_CLIENT_DAYS = 365
ISSUED_DIR = "issued"  # under TLS_DIR: a copy of each certificate issued to a peer
_SKEW = datetime.timedelta(minutes=5)
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")

SubjectAltName = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class TlsPaths:
    """Where the site's certificates and their keys live in a data home."""

    home: Path

    @property
    def site_id(self) -> Path:
        return self.home / SITE_ID_FILE

    @property
    def ca_key(self) -> Path:
        return self.home / SECRETS_DIR / CA_KEY

    @property
    def ca_cert(self) -> Path:
        return self.home / TLS_DIR / CA_CERT

    @property
    def node_key(self) -> Path:
        return self.home / SECRETS_DIR / NODE_KEY

    @property
    def node_cert(self) -> Path:
        return self.home / TLS_DIR / NODE_CERT

    @property
    def issued_dir(self) -> Path:
        return self.home / TLS_DIR / ISSUED_DIR


@dataclass(frozen=True)
class IssuedCertificate:
    """The latest certificate `issue_client` made for one peer (its public copy)."""

    name: str
    not_after: float  # epoch seconds; 0.0 when the copy is unreadable
    serial: int
    server: bool  # also for TLS servers (serverAuth)


@dataclass
class RenewReport:
    """What `renew_node` changed, as lines for the operator."""

    cert: Path
    changes: list[str] = field(default_factory=list)


# --- init ---------------------------------------------------------------------------


def provision_tls(home: Path, *, ca_days: int = DEFAULT_CA_DAYS,
                  node_days: int = DEFAULT_NODE_DAYS,
                  extra_sans: tuple[str, ...] = ()) -> list[Path]:
    """Create whatever is missing of site id, CA and node certificate; return what was made."""
    paths = TlsPaths(Path(home))
    check_lifetimes(home, ca_days=ca_days, node_days=node_days)
    sans = node_sans(extra_sans)
    _ensure_dir(paths.home / SECRETS_DIR, 0o700)
    _ensure_dir(paths.home / TLS_DIR, 0o755)
    created: list[Path] = []
    if _write(paths.site_id, f"{uuid.uuid4()}\n".encode(), 0o644, replace=False):
        created.append(paths.site_id)
    site = read_site_id(paths.home)
    if create_secret_file(paths.ca_key, _new_key_pem()):
        created.append(paths.ca_key)
    ca_key = _load_key(paths.ca_key)
    if not paths.ca_cert.exists():
        ca_cert = _ca_certificate(ca_key, site, ca_days)
        if _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644,
                  replace=False):
            created.append(paths.ca_cert)
    ca_cert = load_certificate(paths.ca_cert)
    if create_secret_file(paths.node_key, _new_key_pem()):
        created.append(paths.node_key)
    if not paths.node_cert.exists():
        node = _issue(ca_key, ca_cert, _load_key(paths.node_key).public_key(),
                      _subject(site, socket.gethostname()), node_days, sans=sans,
                      usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        if _write(paths.node_cert, node.public_bytes(serialization.Encoding.PEM), 0o644,
                  replace=False):
            created.append(paths.node_cert)
    return created


def check_lifetimes(home: Path, *, ca_days: int, node_days: int) -> None:
    """Refuse init's lifetimes before anything is written: out of range, or a node
    certificate asked to outlive the CA made with it (it would be cut short silently),
    or dated from a clock that is plainly wrong."""
    _check_clock(datetime.datetime.now(datetime.UTC))
    _check_days(ca_days, "--ca-days")
    _check_days(node_days, "--cert-days")
    if node_days > ca_days and not TlsPaths(Path(home)).ca_cert.exists():
        raise CertificateError(
            f"--cert-days {node_days} is longer than --ca-days {ca_days}: a certificate "
            "never outlives the CA that signs it",
            hint=f"give --ca-days at least {node_days}, or a shorter --cert-days")


def read_site_id(home: Path) -> str:
    path = TlsPaths(Path(home)).site_id
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise CertificateError(f"{path}: no site id",
                               hint="run `pacs-edge init` to create it") from None
    if not value or not value.isprintable() or len(value) > 64:
        raise CertificateError(f"{path}: the site id is not a short line of text",
                               hint="restore the file; the site id names the site CA")
    return value


# --- client certificates ------------------------------------------------------------


def issue_client(home: Path, name: str, out_dir: Path, *, days: int = DEFAULT_CLIENT_DAYS,
                 server: bool = False, sans: tuple[str, ...] = ()) -> list[Path]:
    """Write `<name>.key` (0600), `<name>.pem` and `ca.pem` into `out_dir`; never overwrite.

    With `server`, the certificate may also serve TLS (serverAuth), named by `sans`.
    """
    if sans and not server:
        raise CertificateError("--san applies to server certificates only",
                               hint="add --server, or leave out --san")
    if not _CLIENT_NAME.match(name):
        raise CertificateError(f"client name {name!r} is not 1-64 letters, digits, '.', '_' "
                               "or '-' (starting with a letter or digit)",
                               hint="use the device's host name or AE title, e.g. ct-scanner-1")
    _check_days(days, "--days")
    alt_names = [san for san in (parse_san(value) for value in sans) if san is not None]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    paths = TlsPaths(Path(home))
    ca_key, ca_cert = _load_ca(paths)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{name}.key", out_dir / f"{name}.pem", out_dir / CA_CERT]
    existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if existing:
        raise CertificateError(f"would overwrite {', '.join(existing)}",
                               hint="choose another --out folder or move the old files away")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_pem = _new_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = _issue(ca_key, ca_cert, key.public_key(), _subject(read_site_id(paths.home), name),
                  days, sans=alt_names, usages=usages)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    create_secret_file(targets[0], key_pem)
    _write(targets[1], cert_pem, 0o644, replace=False)
    _write(targets[2], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=False)
    # The box keeps the public copy, so that it can warn before the peer's certificate
    # expires (`status`, `certs list`), even if the peer never called over TLS.
    _write(paths.issued_dir / f"{name}.pem", cert_pem, 0o644, replace=True)
    return targets


def issued_certificates(home: Path) -> list[IssuedCertificate]:
    """The latest certificate issued to each peer name, the first to expire first."""
    folder = TlsPaths(Path(home)).issued_dir
    found = []
    for path in sorted(folder.glob("*.pem")) if folder.is_dir() else []:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            found.append(IssuedCertificate(path.stem, 0.0, 0, False))  # as good as expired
            continue
        found.append(IssuedCertificate(
            path.stem, cert.not_valid_after_utc.timestamp(), cert.serial_number,
            ExtendedKeyUsageOID.SERVER_AUTH in _usages(cert)))
    return sorted(found, key=lambda c: (c.not_after, c.name))


# --- renewal ------------------------------------------------------------------------


def renew_node(home: Path, *, days: int | None = None, extra_sans: tuple[str, ...] = (),
               new_key: bool = False) -> RenewReport:
    """Re-issue the node certificate from the site CA; report serial, validity, SAN changes.

    `days` defaults to the current certificate's lifetime. The SANs are this host's
    names and addresses as detected now, plus `extra_sans`; without `extra_sans`,
    plus every name of the current certificate: a renewal (the one the expiry
    warning asks for, say) must not drop the name browsers and peers use, which
    `init --san` gave and nothing on this host can detect again.
    """
    paths = TlsPaths(Path(home))
    ca_key, ca_cert = _load_ca(paths)
    old = load_certificate(paths.node_cert) if paths.node_cert.exists() else None
    if not extra_sans and old is not None:
        extra_sans = tuple(str(san.value) for san in _sans(old))
    if days is None:
        days = (old.not_valid_after_utc - old.not_valid_before_utc - _SKEW).days if old \
            else DEFAULT_NODE_DAYS
    _check_days(days, "--days")
    report = RenewReport(paths.node_cert)
    if new_key or not paths.node_key.exists():
        _write(paths.node_key, _new_key_pem(), 0o600, replace=True)
        report.changes.append("key: new node key")
    else:
        report.changes.append("key: kept")
    public = _load_key(paths.node_key).public_key()
    cert = _issue(ca_key, ca_cert, public, _subject(read_site_id(paths.home),
                                                    socket.gethostname()),
                  days, sans=node_sans(extra_sans),
                  usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    _write(paths.node_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=True)
    report.changes += _differences(old, cert, ca_cert)
    return report


def _differences(old: x509.Certificate | None, new: x509.Certificate,
                 ca_cert: x509.Certificate) -> list[str]:
    if old is None:
        return [f"certificate: issued (there was none), serial {new.serial_number:x}"]
    lines = [f"serial: {old.serial_number:x} -> {new.serial_number:x}",
             f"valid until: {old.not_valid_after_utc:%Y-%m-%d %H:%M} UTC -> "
             f"{new.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    if old.issuer != ca_cert.subject or not _signed_by(old, ca_cert):
        lines.append("issuer: the old certificate was not issued by this site CA; now it is")
    if old.public_key() != new.public_key():
        lines.append("public key: changed")
    before, after = set(map(_san_text, _sans(old))), set(map(_san_text, _sans(new)))
    lines += [f"subjectAltName added: {s}" for s in sorted(after - before)]
    lines += [f"subjectAltName removed: {s}" for s in sorted(before - after)]
    if before == after:
        lines.append("subjectAltNames: unchanged")
    return lines


# --- names and addresses -------------------------------------------------------------


def node_sans(extra: tuple[str, ...] = ()) -> list[SubjectAltName]:
    """This host's names and addresses, loopback, and `extra` (names or IP addresses)."""
    host, fqdn = socket.gethostname(), socket.getfqdn()
    names = [host, fqdn, "localhost"]
    addresses: list[str] = ["127.0.0.1", "::1"]
    for name in {host, fqdn}:
        with contextlib.suppress(OSError):
            addresses += [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
    sans: list[SubjectAltName] = []
    for value in [*names, *addresses, *extra]:
        san = parse_san(value, strict=value in extra)
        if san is not None and san not in sans:
            sans.append(san)
    return sans


def parse_san(value: str, *, strict: bool = True) -> SubjectAltName | None:
    """An IP address or DNS name SAN; with `strict`, a bad value is an error, else None."""
    value = value.strip()
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone
        return x509.IPAddress(address)
    if _DNS_NAME.match(value):
        return x509.DNSName(value.rstrip(".").lower())
    if strict:
        raise CertificateError(f"subjectAltName {value!r} is neither an IP address nor a "
                               "DNS name", hint="give a host name (pacs.example.org) or an "
                               "address (10.0.0.5)")
    return None


def _san_text(san: SubjectAltName) -> str:
    return f"IP:{san.value}" if isinstance(san, x509.IPAddress) else f"DNS:{san.value}"


def _sans(cert: x509.Certificate) -> list[SubjectAltName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n for n in ext.value if isinstance(n, x509.DNSName | x509.IPAddress)]


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


# --- certificates ------------------------------------------------------------------


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertificateError(f"{path}: certificate is missing",
                               hint="run `pacs-edge init` to create the site's certificates"
                               ) from None
    except ValueError as exc:
        raise CertificateError(f"{path}: not a PEM certificate ({exc})",
                               hint="restore it, or remove it and run `pacs-edge init`") from exc


def _subject(site: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"site {site}"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
    ])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    _check_clock(now)
    return now - _SKEW, now + datetime.timedelta(days=days)


def _check_clock(now: datetime.datetime) -> None:
    """A box with a dead RTC battery boots in 1970 or 2000: certificates dated from that
    clock are expired, or nearly, once NTP sets it, and every TLS peer refuses them."""
    if now < EARLIEST_CLOCK:
        raise CertificateError(
            f"the clock says {now:%Y-%m-%d}, before this software was written: certificates"
            " dated from it would be expired once the clock is set",
            hint="set the clock (timedatectl; NTP) and run the command again")


def _ca_certificate(key: ec.EllipticCurvePrivateKey, site: str,
                    days: int) -> x509.Certificate:
    subject = _subject(site, "pacs-edge site CA")
    start, end = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
           public: ec.EllipticCurvePublicKey, subject: x509.Name, days: int, *,
           sans: list[SubjectAltName], usages: list[x509.ObjectIdentifier]) -> x509.Certificate:
    start, end = _validity(days)
    ca_end = ca_cert.not_valid_after_utc
    if end > ca_end:
        end = ca_end  # a certificate never outlives its issuer
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, x509.InvalidSignature):
        return False
    return True


def _load_ca(paths: TlsPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not paths.ca_key.exists():
        raise CertificateError(f"{paths.ca_key}: the site CA key is missing",
                               hint="run `pacs-edge init` on the box that holds the site CA")
    key, cert = _load_key(paths.ca_key), load_certificate(paths.ca_cert)
    if cert.public_key() != key.public_key():
        raise CertificateError(f"{paths.ca_cert} does not belong to {paths.ca_key}",
                               hint="restore the matching CA certificate from a backup")
    return key, cert


# --- keys and files ---------------------------------------------------------------


def _new_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a private key file, refusing one that group or others can access."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:
            raise CertificateError(f"{path}: private key has mode {mode:04o}: group or "
                                   "others can access it",
                                   hint=f"chmod 600 {path} (and consider the key exposed)")
        data = fh.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise CertificateError(f"{path}: not an unencrypted PEM private key",
                               hint="restore the key from a backup") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: not an EC private key",
                               hint="restore the key from a backup")
    return key


def _check_days(days: int, option: str) -> None:
    if not 1 <= days <= 36500:
        raise CertificateError(f"{option} {days} is out of range: expected 1-36500 days",
                               hint=f"give {option} a number of days, e.g. 365")


def _ensure_dir(folder: Path, mode: int) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=mode, exist_ok=True)
        os.chmod(folder, mode)  # whatever the umask did


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> bool:
    return write_file(path, data, mode, replace=replace)
