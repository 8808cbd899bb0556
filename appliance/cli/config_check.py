"""`pacs-edge config check`: the config file and every file it makes the services read.

Loading the config already validates each value (key, bad value, what would
be valid). This goes on to what a service would trip over only at start or,
worse, hours later: the peer allowlist, the site secrets (present, 0600, the
right length), the TLS certificate chain when TLS is on (loadable, matching
key, not expired), the cloud URL and its credentials, the syslog TLS files,
the folders the services write and the viewer's build (a warning: serve runs
without it), and a store reserve of 0 (a warning: an older `init` wrote it).
Each check runs through the same loader the service uses, so a
check that passes means the service will load it too.
Every problem is reported, not just the first.

`check_files` checks a config file or a peers file alone, before it replaces
the live one (the Ansible role's `validate:` step): the values, the listeners,
the storage classes, the allowlist, but none of the files a config names (on a first deployment the
secrets do not exist yet; the full check runs after `init`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.base.config import Config, StoreConfig, config_from_mapping, read_toml
from appliance.base.errors import PacsEdgeError
from appliance.dimse.negotiation import check_extra_storage_classes
from appliance.dimse.tls import server_context
from appliance.http.viewer import viewer_root
from appliance.services import launch_links
from appliance.services.peers import Allowlist
from provisioning.certs import TlsPaths, load_certificate
from provisioning.escrow_state import ESCROW_HINT, escrow_status
from provisioning.home import LOG_KEY
from provisioning.keyring import load_keyring
from provisioning.site_secrets import load_name_secret, load_secret_file, secrets_dir
from sync.blobstore.factory import open_blob_store


@dataclass(frozen=True)
class Finding:
    """One check: what was checked, and the problem (empty when it passed)."""

    what: str
    problem: str = ""
    hint: str = ""
    warning: str = ""  # passed, but the operator should act (e.g. no key escrow yet)

    @property
    def ok(self) -> bool:
        return not self.problem


def check_home(config: Config) -> list[Finding]:
    """Run every check against `config` (already loaded, so its values are valid)."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("listeners", lambda: _listeners(config)),
        ("storage classes", lambda: _storage_classes(config)),
        ("peer allowlist", lambda: _peers(config)),
        ("site key(s)", lambda: _site_keys(config.home)),
        ("name secret", lambda: _quiet(load_name_secret, config.home)),
        ("log key", lambda: _quiet(load_secret_file, secrets_dir(config.home) / LOG_KEY)),
        ("launch-link key", lambda: _link_key(config.home)),
        ("DICOM TLS certificates", lambda: _tls(config)),
        ("cloud", lambda: _cloud(config)),
        ("audit syslog TLS files", lambda: _syslog_files(config)),
        ("writable folders", lambda: _folders(config)),
    ]
    findings = [_run(what, check) for what, check in checks]
    findings.append(_viewer(config))
    findings.append(_store_reserve(config))
    findings.append(_escrow(config))
    return findings


def check_files(home: Path, *, config_file: Path | None = None,
                peers_file: Path | None = None) -> list[Finding]:
    """Check `config_file` (as if it were `<home>/pacs-edge.toml`: relative paths are the
    home's) and `peers_file` alone: what serve would refuse in them, nothing they name."""
    findings = []
    if config_file is not None:
        try:
            config = load_config_file(config_file, home)
        except PacsEdgeError as exc:
            findings.append(Finding(f"config file {config_file}", str(exc), exc.hint or ""))
        else:
            findings.append(Finding(f"config file {config_file}"))
            findings.append(_run("listeners", lambda: _listeners(config)))
            findings.append(_run("storage classes", lambda: _storage_classes(config)))
    if peers_file is not None:
        findings.append(_run(f"peer allowlist {peers_file}", lambda: _peers_file(peers_file)))
    return findings


def load_config_file(path: Path, home: Path) -> Config:
    """`load_config`'s reading and validation, for a file that is not (yet) the home's."""
    try:
        raw = read_toml(path)
    except OSError as exc:
        raise PacsEdgeError(f"cannot read {path}: {exc.strerror}",
                            hint="name an existing config file") from exc
    return config_from_mapping(home, raw, source=str(path))


def _run(what: str, check: Callable[[], str]) -> Finding:
    try:
        detail = check()
    except PacsEdgeError as exc:
        return Finding(what, str(exc), exc.hint or "")
    return Finding(f"{what}: {detail}" if detail else what)


def _link_key(home: Path) -> str:
    """Optional in a home older than launch links: the first `pacs-edge link` makes it."""
    if not launch_links.key_path(home).exists():
        return "none yet (the first `pacs-edge link` creates it; restart serve then)"
    load_secret_file(launch_links.key_path(home))
    return ""


def _viewer(config: Config) -> Finding:
    """A warning, not an error: serve runs without the viewer (its pages answer 503)."""
    if not config.http.port:
        return Finding("viewer: off (no web server)")
    root = viewer_root(config.http.viewer_root, config.home)
    if root is None:
        return Finding("viewer: off ([http] viewer_root is empty)")
    if (root / "index.html").is_file():
        return Finding(f"viewer: {root}")
    return Finding("viewer", warning=f"no OHIF build in {root}: the viewer's pages answer 503",
                   hint="run scripts/install-ohif.sh (make viewer) in a checkout, or set"
                        " [http] viewer_root to the folder that holds the build")


def _store_reserve(config: Config) -> Finding:
    """A warning, not an error: 0 is allowed, but every `init` before the 64 MB default
    wrote `reserve_mb = 0` into the config, and an upgraded box keeps it."""
    if config.store.reserve_mb:
        return Finding(f"store reserve: {config.store.reserve_mb} MB")
    default = StoreConfig().reserve_mb
    return Finding("store reserve", warning="[store] reserve_mb = 0: ingest takes the disk"
                   " to its last block, and a disk filled the rest of the way leaves no room"
                   " to record even the eviction that would free space",
                   hint=f"set [store] reserve_mb = {default} (the default; a config written by"
                        " an older `pacs-edge init` holds 0)")


def _escrow(config: Config) -> Finding:
    """A warning, not an error: the box runs without an escrow, it only refuses to evict."""
    status = escrow_status(config.home)
    if status.problem is None:
        return Finding(f"site key escrow: {status.escrowed_key_id} on {status.escrowed_at}")
    what = ("evicting anyway ([sync] evict_without_escrow = true)"
            if config.sync.evict_without_escrow else "eviction is refused until then")
    return Finding("site key escrow", warning=f"{status.problem}; {what}", hint=ESCROW_HINT)


def _quiet(load: Callable[[Path], object], path: Path) -> str:
    load(path)
    return ""


def _peers(config: Config) -> str:
    return f"{len(Allowlist(config.peers_path).peers())} peer(s)"


def _peers_file(path: Path) -> str:
    if not path.exists():  # Allowlist reads a missing file as "no peers"
        raise PacsEdgeError(f"no file at {path}", hint="name an existing peers.toml")
    return f"{len(Allowlist(path).peers())} peer(s)"


# Addresses that listen on every interface (an IPv6 wildcard takes IPv4 too, dual stack).
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def listeners(config: Config) -> list[tuple[str, str, int]]:
    """(key, host, port) of each TCP listener serve opens; port 0 (a free port the kernel
    picks, or off) is none. The metrics listener runs only with the web server off."""
    dicom, hl7, http, metrics = config.dicom, config.hl7, config.http, config.metrics
    found = [("[dicom] port", dicom.host, dicom.port if dicom.plain_enabled else 0),
             ("[dicom] tls_port", dicom.host, dicom.tls_port),
             ("[hl7] port", hl7.host, hl7.port),
             ("[http] port", http.host, http.port),
             ("[metrics] port", metrics.host,
              metrics.port if metrics.enabled and not http.port else 0)]
    return [listener for listener in found if listener[2]]


def _listeners(config: Config) -> str:
    """Two listeners on one port of one address: serve would fail at start ("address
    already in use"), after a restart that config check had let through."""
    opened = listeners(config)
    for i, (key, host, port) in enumerate(opened):
        for other, other_host, other_port in opened[:i]:
            if port == other_port and (host == other_host or {host, other_host} & _WILDCARDS):
                raise PacsEdgeError(
                    f"{other} and {key} both listen on {other_host or '*'}:{port}"
                    + ("" if host == other_host else f" and {host or '*'}:{port}"),
                    hint="give each listener its own port (or turn one off with port 0)")
    return ", ".join(f"{_NAMES[key]} {port}" for key, _, port in opened)


def _storage_classes(config: Config) -> str:
    check_extra_storage_classes(config.dicom)
    extra = len(config.dicom.extra_storage_classes)
    return f"the standard ones and {extra} more" if extra else "the standard ones"


_NAMES = {"[dicom] port": "DICOM", "[dicom] tls_port": "DICOM TLS", "[hl7] port": "HL7",
          "[http] port": "HTTPS", "[metrics] port": "metrics"}


def _site_keys(home: Path) -> str:
    ring = load_keyring(home)
    older = len(ring.older_ids)
    return f"current {ring.current_id}" + (
        f", {older} older kept until a rotation finishes" if older else "")


def _tls(config: Config) -> str:
    if not config.dicom.tls_port:
        return "off ([dicom] tls_port = 0)"
    paths = TlsPaths(config.home)
    server_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert,
                   require_client_cert=config.dicom.tls_require_client_cert)
    now = datetime.datetime.now(datetime.UTC)
    expiries = {}
    for name, path in (("node certificate", paths.node_cert), ("site CA", paths.ca_cert)):
        expiries[name] = load_certificate(path).not_valid_after_utc
        if expiries[name] <= now:
            raise PacsEdgeError(
                f"the {name} {path} expired on {expiries[name]:%Y-%m-%d}",
                hint="`pacs-edge certs renew` re-issues the node certificate"
                if name == "node certificate" else "the site CA must be re-created")
    return f"node certificate valid until {expiries['node certificate']:%Y-%m-%d}"


def _cloud(config: Config) -> str:
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    store.close()
    return config.cloud_url.split("?", 1)[0]


def _syslog_files(config: Config) -> str:
    audit = config.audit
    if not audit.syslog_host:
        return "syslog forwarding off"
    named = {"audit.syslog_ca_file": audit.syslog_ca_file,
             "audit.syslog_cert_file": audit.syslog_cert_file,
             "audit.syslog_key_file": audit.syslog_key_file}
    for key, path in named.items():
        if path is None:
            continue
        full = config.home / path  # an absolute path stays absolute
        if key == "audit.syslog_key_file":
            _private_file(key, full)
        elif not os.access(full, os.R_OK) or not full.is_file():
            raise PacsEdgeError(f"{key} = {str(path)!r}: no readable file there",
                                hint="fix the path in pacs-edge.toml")
    return f"{audit.syslog_host}:{audit.syslog_port}"


def _private_file(key: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise PacsEdgeError(f"{key} = {str(path)!r}: {exc.strerror}",
                            hint="fix the path in pacs-edge.toml") from exc
    if mode & 0o077:
        raise PacsEdgeError(f"{key} = {str(path)!r} has mode {mode:04o}: group or others "
                            "can access it", hint=f"chmod 600 {path}")


def _folders(config: Config) -> str:
    folders = [("store.path", config.store.path), ("index.path", config.index.path.parent),
               *(("dropfolder.paths", path) for path in config.dropfolder.paths)]
    for key, folder in folders:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PacsEdgeError(f"{key}: {existing} is not a folder this user can write",
                                hint="fix the path in pacs-edge.toml, or the folder's owner "
                                "and mode")
    return ""
