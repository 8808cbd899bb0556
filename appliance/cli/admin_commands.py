"""Admin commands: `certs issue`, `certs list`, `certs renew`, `keys rotate`, and init's
provisioning step.

The command line is the composition root: it wires provisioning (which
imports only the base floor) to the config, the index and the blob store.
Provisioning's errors are PacsEdgeErrors: expected_errors shows them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click
from rich.table import Table

from appliance.base.config import CONFIG_FILE, load_config
from appliance.base.errors import PacsEdgeError
from appliance.base.human import human_time
from appliance.base.logsetup import setup_logging
from appliance.cli.common import (
    LazyGroup,
    audit_change,
    count_bar,
    err,
    expected_errors,
    home_option,
    load,
    out,
)
from provisioning import certs as site_certs
from provisioning.keyring import replace_site_secrets

san_option = click.option(
    "--san", "sans", multiple=True, metavar="NAME_OR_IP",
    help="Another subjectAltName for the node certificate (repeatable): a DNS name or an IP.")


# --- init ---------------------------------------------------------------------------


def provision_on_init(home: Path, *, force_new_keys: bool, cert_days: int, ca_days: int,
                      sans: tuple[str, ...]) -> list[str]:
    """init's provisioning: the site id, CA and node certificate, and with `force_new_keys`
    a new site key and name secret (refused while the index records packs in the cloud,
    or the cloud holds study versions: the index may be lost or rebuilt)."""
    created: list[str] = []
    if force_new_keys:
        packs = asyncio.run(_pack_count(home))
        if packs or _cloud_holds_studies(home):
            held = f"{packs} pack(s)" if packs else "study versions"
            raise PacsEdgeError(
                f"refusing --force-new-keys: the cloud holds {held} wrapped "
                "with the current site key, which a new key could not open",
                hint="rotate instead: `pacs-edge keys rotate` makes a new site key and "
                "re-wraps every pack under it")
        created += [f"{path} (new; the old key is gone)"
                    for path in replace_site_secrets(home)]
    created += [str(path) for path in site_certs.provision_tls(
        home, ca_days=ca_days, node_days=cert_days, extra_sans=sans)]
    return created


def _cloud_holds_studies(home: Path) -> bool:
    """Whether the home's cloud holds any study blob (the index alone may not know:
    moved away in a rebuild). A cloud that cannot be listed refuses, by its error."""
    from sync.blobstore.base import BlobStoreUnavailable
    from sync.blobstore.factory import open_blob_store
    from sync.pack import naming

    if not (home / CONFIG_FILE).exists():
        return False
    config = load_config(home)
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        return next(iter(store.list(naming.STUDIES_PREFIX)), None) is not None
    except BlobStoreUnavailable as exc:
        raise PacsEdgeError(
            f"refusing --force-new-keys: the cloud {config.cloud_url} cannot be listed"
            f" ({exc.message}), so whether it holds study versions the current site key"
            " wraps is unknown; nothing was replaced",
            hint="run it again once the cloud answers (check [cloud] url and its"
                 " credentials)") from exc
    finally:
        store.close()


async def _pack_count(home: Path) -> int:
    from appliance.store.index import Index

    if not (home / CONFIG_FILE).exists():
        return 0
    index_path = load_config(home).index.path
    if not index_path.exists():
        return 0
    async with Index(index_path) as index:
        return await index.pack_count()


# --- certs --------------------------------------------------------------------------


@click.group()
def certs() -> None:
    """The site CA and the certificates it issues (for DICOM TLS and HTTPS)."""


@certs.command("issue")
@home_option
@click.argument("name")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for NAME.key (0600), NAME.pem and ca.pem; never overwritten.")
@click.option("--days", type=int, default=site_certs.DEFAULT_CLIENT_DAYS, show_default=True,
              help="Lifetime of the client certificate.")
@click.option("--server", is_flag=True,
              help="Also for TLS servers (serverAuth): a TLS C-MOVE destination's certificate.")
@click.option("--san", "sans", multiple=True, metavar="NAME_OR_IP",
              help="With --server: a subjectAltName (repeatable), a DNS name or an IP.")
@expected_errors
def certs_issue(home: Path | None, name: str, out_dir: Path, days: int, server: bool,
                sans: tuple[str, ...]) -> None:
    """Issue a key and certificate for the peer NAME (a modality or workstation).

    The box accepts the certificate only from the peer named NAME in the
    allowlist (`pacs-edge peers add NAME ...`), calling with that peer's AE title.
    """
    config = load(home)
    written = site_certs.issue_client(config.home, name, out_dir, days=days, server=server,
                                      sans=sans)
    audit_change(config, f"certificate issued to peer {name}")
    kind = "client and server" if server else "client"
    out.print(f"issued {kind} certificate for {name}, signed by the site CA:", highlight=False)
    for path in written:
        out.print(f"  wrote {path}", highlight=False)
    out.print("install the key and certificate on the device and ca.pem as its trusted CA;"
              " the key file is secret", highlight=False)
    out.print(f"the box accepts it only from the peer named {name} (pacs-edge peers add"
              f" {name} ...), calling with that peer's AE title", highlight=False)


@certs.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def certs_list(home: Path | None, as_json: bool) -> None:
    """The latest certificate issued to each peer name, the first to expire first.

    Kept by `certs issue` since 2026-12 (a copy of the public certificate in
    tls/issued/); `status` warns 30 days before one of a current peer expires.
    """
    from appliance.services.peers import Allowlist

    config = load(home)
    issued = site_certs.issued_certificates(config.home)
    peers = Allowlist(config.peers_path).peers()
    if as_json:
        click.echo(json.dumps([
            {"name": c.name, "not_after": c.not_after, "serial": f"{c.serial:x}",
             "server": c.server, "peer": c.name in peers} for c in issued], indent=2))
        return
    if not issued:
        out.print("no certificates issued yet (pacs-edge certs issue NAME --out DIR)")
        return
    now = time.time()
    table = Table("name", "expires", "usage", "serial", "a peer now")
    for cert in issued:
        expires = human_time(cert.not_after) if cert.not_after else "unreadable copy"
        if cert.not_after <= now:
            expires = f"[red]{expires} (expired)[/red]"
        table.add_row(cert.name, expires, "client, server" if cert.server else "client",
                      f"{cert.serial:x}"[:16], "yes" if cert.name in peers else "no")
    out.print(table)


@certs.command("renew")
@home_option
@click.option("--days", type=int, default=None,
              help="Lifetime of the new certificate (default: that of the current one).")
@click.option("--san", "sans", multiple=True, metavar="NAME_OR_IP",
              help="A subjectAltName beyond this host's detected names (repeatable); given, "
                   "these replace the current certificate's other names, which are kept "
                   "otherwise.")
@click.option("--new-key", is_flag=True, help="Also replace the node's private key.")
@expected_errors
def certs_renew(home: Path | None, days: int | None, sans: tuple[str, ...],
                new_key: bool) -> None:
    """Re-issue this box's node certificate from the same site CA; say what changed."""
    config = load(home)
    report = site_certs.renew_node(config.home, days=days, extra_sans=sans, new_key=new_key)
    audit_change(config, "node certificate renewed" + (" with a new key" if new_key else ""))
    out.print(f"renewed {report.cert}", highlight=False)
    for line in report.changes:
        out.print(f"  {line}", highlight=False)
    if new_key:  # the unit's sandbox binds the key file serve started with (node_tls.py)
        out.print("restart pacs-edge to serve the new key and certificate", highlight=False)
    else:
        out.print("reload pacs-edge to serve the new certificate (systemctl reload"
                  " pacs-edge; no connection is dropped)", highlight=False)


# --- keys ---------------------------------------------------------------------------


@click.group(cls=LazyGroup, lazy={"escrow": "appliance.cli.reader_commands:keys_escrow",
                                   "recover": "appliance.cli.reader_commands:keys_recover"})
def keys() -> None:
    """The site key that wraps every pack's data key."""


@keys.command("rotate")
@home_option
@expected_errors
def keys_rotate(home: Path | None) -> None:
    """New site key; re-wrap every pack's data key under it (resumes if interrupted).

    Stop the sync agent first. Pack data is not re-uploaded: only each pack's
    small key object is replaced. The old key is kept until every pack is
    re-wrapped, then removed.
    """
    from sync.blobstore.factory import open_blob_store
    from sync.rotate import rotate_site_key

    config = load(home)
    setup_logging("warning")
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        with count_bar("re-wrapping") as progress:
            report = asyncio.run(rotate_site_key(config, store, on_progress=progress))
    finally:
        store.close()
    audit_change(config, f"site key rotated to {report.new_key_id}"
                 + ("" if report.complete else " (packs left to re-wrap)")
                 + (" (old key kept until the new one is escrowed)"
                    if report.awaiting_escrow else ""))
    verb = "resumed the interrupted rotation to" if report.resumed else "new"
    out.print(f"{verb} site key {report.new_key_id}: re-wrapped {report.migrated} pack(s), "
              f"{report.already_migrated} already done, {report.skipped_uploading} unfinished "
              "upload(s) left to the agent", highlight=False)
    for failure in report.failures:
        err.print(f"  failed: {failure}", highlight=False)
    if not report.complete:
        err.print("the old site key is kept until every pack is re-wrapped; fix the failures "
                  "and run `pacs-edge keys rotate` again to resume", highlight=False)
        raise SystemExit(1)
    if report.awaiting_escrow:
        out.print(f"the old site key {report.awaiting_escrow} and its wraps are kept: the "
                  "escrow holds that key and opens every pack until the new key is "
                  "escrowed. Escrow it now (`pacs-edge keys escrow --out FILE`), then run "
                  "`pacs-edge keys rotate` again to retire the old key; until then nothing "
                  "is evicted", highlight=False, markup=False)
        return
    retired = ", ".join(report.retired) or "none left"
    evicting = ("the agent evicts anyway ([sync] evict_without_escrow = true)"
                if config.sync.evict_without_escrow else "until then nothing is evicted")
    out.print(f"retired the old site key(s): {retired}; escrow the new site key now "
              f"(`pacs-edge keys escrow --out FILE`): the old escrow copy no longer opens "
              f"anything, and {evicting}", highlight=False, markup=False)
