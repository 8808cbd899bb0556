"""The one typed configuration object, loaded from `<home>/pacs-edge.toml`.

Every default lives here, in the dataclass fields. Loading walks the TOML
against these dataclasses: an unknown key, a wrong type or a value out of
range raises ConfigError naming the key, the bad value and what is valid.
Relative paths are resolved against the data home.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.base.errors import ConfigError, HomeError
from appliance.base.hl7_charsets import CHARSETS, charset_name
from appliance.base.uids import is_valid_uid

CONFIG_FILE = "pacs-edge.toml"
PEERS_FILE = "peers.toml"
HOME_ENV = "PACS_EDGE_HOME"
DEFAULT_HOME = Path("data")


def _check(check: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    return {"check": check, "expected": expected}


def default_workers() -> int:
    """One DIMSE worker process per two cores this process may run on, 1 to 4.

    Measured on 2 cores (docs/benchmarks.md, C-STORE receive path): a fourth
    worker lost a third of the throughput; after the second receive-path round a
    second worker gains 7-18% on 4 associations of CT (five runs) and nothing on
    one, for another ~100 MB of memory. The default leaves the other core to the
    kernel's share of each instance (copies, fsyncs), the sync agent's encryption
    and the web server; a site whose modalities send several studies at once may
    set `workers = 2`. An association is served by one worker whatever their number.
    """
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))


def is_ae_title(value: str) -> bool:
    return 0 < len(value.strip()) <= 16 and value.isascii() and "\\" not in value and (
        all(c.isprintable() for c in value)
    )


MAX_EXTRA_STORAGE_CLASSES = 64  # each is a supported presentation context of its own


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = field(default="EDGE", metadata=_check(is_ae_title, "1-16 ASCII characters"))
    host: str = "127.0.0.1"
    port: int = field(default=11112, metadata=_check(lambda v: 0 <= v <= 65535, "0-65535"))
    plain_enabled: bool = True
    tls_port: int = field(default=2762, metadata=_check(lambda v: 0 <= v <= 65535,
                                                         "0 (TLS off) or 1-65535"))
    tls_require_client_cert: bool = True
    tls_handshake_timeout: float = field(default=10.0, metadata=_check(lambda v: v > 0, "> 0"))
    max_pdu: int = field(
        default=1_048_576,
        metadata=_check(lambda v: 4096 <= v <= 64 << 20, "4096 to 67108864 bytes"),
    )
    max_associations: int = field(default=32, metadata=_check(lambda v: v >= 1, ">= 1"))
    idle_connection_limit: int = field(default=16, metadata=_check(lambda v: v >= 1, ">= 1"))
    connections_per_address: int = field(default=32, metadata=_check(lambda v: v >= 1, ">= 1"))
    workers: int = field(default_factory=default_workers,
                         metadata=_check(lambda v: 1 <= v <= 64, "1-64 processes"))
    acse_timeout: float = field(default=30.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    dimse_timeout: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    network_timeout: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    connect_timeout: float = field(default=10.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    suboperation_timeout: float = field(
        default=30.0, metadata=_check(lambda v: v > 0, "> 0 seconds")
    )
    suboperation_retries: int = field(default=2, metadata=_check(lambda v: 0 <= v <= 10, "0-10"))
    extra_storage_classes: tuple[str, ...] = field(default=(), metadata=_check(
        lambda v: len(v) <= MAX_EXTRA_STORAGE_CLASSES and all(is_valid_uid(u) for u in v),
        f"at most {MAX_EXTRA_STORAGE_CLASSES} SOP Class UIDs (digits and dots, 64 at most)"))


@dataclass(frozen=True)
class Hl7Config:
    """The HL7 v2 order feed over MLLP (appliance/hl7/listener.py)."""

    port: int = field(default=2575, metadata=_check(lambda v: 0 <= v <= 65535,
                                                     "0 (off) or 1-65535"))
    host: str = "127.0.0.1"
    tls: bool = False
    tls_require_client_cert: bool = True
    max_message_bytes: int = field(
        default=1_048_576, metadata=_check(lambda v: 1024 <= v <= 64 << 20,
                                           "1024 to 67108864 bytes"))
    idle_timeout: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    message_timeout: float = field(default=300.0, metadata=_check(lambda v: v > 0,
                                                                  "> 0 seconds"))
    max_connections: int = field(default=16, metadata=_check(lambda v: v >= 1, ">= 1"))
    unnamed_charset: str = field(default="UNICODE UTF-8", metadata=_check(
        lambda v: charset_name(v) in CHARSETS,
        f"an HL7 character set (MSH-18): {', '.join(CHARSETS)}"))
    processing_ids: tuple[str, ...] = field(default=("P",), metadata=_check(
        lambda v: len(v) > 0 and set(v) <= {"P", "T", "D"},
        'a non-empty list of "P" (production), "T" (training), "D" (debugging)'))


@dataclass(frozen=True)
class HttpConfig:
    """The HTTPS server: DICOMweb, the viewer and its login (appliance/http/, docs/web.md)."""

    port: int = field(default=8443, metadata=_check(lambda v: 0 <= v <= 65535,
                                                     "0 (off) or 1-65535"))
    host: str = "127.0.0.1"
    max_connections: int = field(default=64, metadata=_check(lambda v: v >= 1, ">= 1"))
    connections_per_address: int = field(default=32, metadata=_check(lambda v: v >= 1,
                                                                     ">= 1"))
    max_request_mb: int = field(default=2048, metadata=_check(lambda v: 1 <= v <= 1 << 20,
                                                              "1 to 1048576 MB"))
    idle_timeout: float = field(default=75.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    head_timeout: float = field(default=10.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    viewer_root: str = "auto"
    metadata_cache_mb: int = field(default=1024, metadata=_check(lambda v: 1 <= v <= 1 << 30,
                                                                 "1 to 1073741824 MB"))
    qido_max_results: int = field(default=5000, metadata=_check(lambda v: 1 <= v <= 1_000_000,
                                                                "1 to 1000000"))
    recall_wait_seconds: float = field(
        default=15.0, metadata=_check(lambda v: 0 < v <= 600, "above 0, at most 600 seconds"))


def _networks_ok(values: tuple[str, ...]) -> bool:
    try:
        for value in values:
            ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics and health endpoints (docs/operations.md)."""

    enabled: bool = True
    allow: tuple[str, ...] = field(default=("127.0.0.1/32", "::1/128"), metadata=_check(
        _networks_ok, "a list of addresses or networks such as \"10.0.0.0/8\""))
    host: str = "127.0.0.1"
    port: int = field(default=9464, metadata=_check(lambda v: 0 <= v <= 65535,
                                                    "0-65535 (0: no listener of its own)"))


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("store")
    # The room new instances (ingest, recall) leave free, for the index, the audit log,
    # HL7 orders, web logins and the sync agent's eviction once the store is full. At 0
    # ingest takes the disk to its last block, and a disk then filled the rest of the
    # way leaves no room to record even the eviction that would free space.
    reserve_mb: int = field(default=64, metadata=_check(lambda v: v >= 0, ">= 0"))
    max_inflated_mb: int = field(default=512, metadata=_check(lambda v: 1 <= v <= 1 << 20,
                                                              "1 to 1048576 MB"))

    @property
    def reserve_bytes(self) -> int:
        return self.reserve_mb << 20


@dataclass(frozen=True)
class IndexConfig:
    path: Path = Path("index.sqlite3")
    commit_window_ms: float = field(
        default=0.0, metadata=_check(lambda v: 0 <= v <= 1000, "0-1000 milliseconds")
    )


@dataclass(frozen=True)
class DropFolderConfig:
    enabled: bool = True
    paths: tuple[Path, ...] = (Path("incoming"),)
    stable_seconds: float = field(default=2.0, metadata=_check(lambda v: v >= 0, ">= 0 seconds"))
    rescan_seconds: float = field(default=30.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    after_ingest: str = field(
        default="delete",
        metadata=_check(lambda v: v in {"delete", "move"}, "delete or move (to <folder>.done/)"),
    )


_DAYS = ">= 0 days (0: never)"


def _cloud_url_ok(value: str) -> bool:
    return value == "" or value.startswith(("file:///", "azure://"))


@dataclass(frozen=True)
class CloudConfig:
    url: str = field(default="", metadata=_check(
        _cloud_url_ok, '"" (the data home\'s cloud/ folder), file:///ABSOLUTE/PATH or azure://CONTAINER'))
    credentials_file: Path | None = None


@dataclass(frozen=True)
class SyncConfig:
    stable_after_seconds: float = field(default=300.0, metadata=_check(lambda v: v >= 0, ">= 0"))
    replicate_interval_seconds: float = field(
        default=60.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    evict_after_days: float = field(default=30.0, metadata=_check(lambda v: v >= 0, ">= 0 days"))
    disk_high_watermark_percent: float = field(
        default=85.0, metadata=_check(lambda v: 0 < v <= 100, "1-100"))
    disk_low_watermark_percent: float = field(
        default=75.0, metadata=_check(lambda v: 0 < v <= 100, "1-100"))
    cool_after_days: float = field(default=30.0, metadata=_check(lambda v: v >= 0, _DAYS))
    cold_after_days: float = field(default=90.0, metadata=_check(lambda v: v >= 0, _DAYS))
    archive_after_days: float = field(default=0.0, metadata=_check(lambda v: v >= 0, _DAYS))
    segment_size: int = field(
        default=1 << 20, metadata=_check(lambda v: 4096 <= v <= 64 << 20, "4096 to 67108864"))
    recall_poll_seconds: float = field(default=1.0, metadata=_check(lambda v: v > 0, "> 0"))
    rehydrate_poll_seconds: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0"))
    rehydrate_priority: str = field(default="standard", metadata=_check(
        lambda v: v in {"standard", "high"}, "standard or high"))
    recall_timeout_seconds: float = field(
        default=600.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    evict_without_escrow: bool = False
    scrub_fraction_per_day: float = field(
        default=0.01, metadata=_check(lambda v: 0 <= v <= 1, "0 (off) to 1"))


@dataclass(frozen=True)
class AuditConfig:
    site_id: str = ""
    flush_seconds: float = field(default=1.0, metadata=_check(lambda v: 0 < v <= 60,
                                                                   "above 0, at most 60 s"))
    batch_seconds: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    rejection_window_seconds: float = field(
        default=300.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    anchor_interval_seconds: float = field(
        default=300.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    access_window_seconds: float = field(
        default=300.0, metadata=_check(lambda v: v > 0, "> 0 seconds"))
    syslog_host: str = ""
    syslog_port: int = field(default=6514, metadata=_check(lambda v: 0 < v <= 65535, "1-65535"))
    syslog_ca_file: Path | None = None
    syslog_cert_file: Path | None = None
    syslog_key_file: Path | None = None
    syslog_retry_seconds: float = field(default=2.0, metadata=_check(lambda v: v > 0, "> 0"))


@dataclass(frozen=True)
class WorkflowConfig:
    """Storage Commitment, MPPS and worklist (docs/workflow.md)."""

    commit_requires_cloud: bool = False
    commit_cloud_wait_hours: float = field(default=24.0, metadata=_check(lambda v: v > 0, "> 0"))
    commit_retry_seconds: float = field(default=60.0, metadata=_check(lambda v: v > 0, "> 0"))
    commit_give_up_hours: float = field(default=72.0, metadata=_check(lambda v: v > 0, "> 0"))
    worklist_past_days: int = field(default=30, metadata=_check(lambda v: 0 <= v <= 36_500,
                                                                "0 (no bound) to 36500 days"))


def _clock_ok(value: str) -> bool:
    hours, sep, minutes = value.partition(":")
    return value == "" or (sep == ":" and len(hours) == 2 and len(minutes) == 2
                           and (hours + minutes).isascii()
                           and hours.isdigit() and minutes.isdigit()
                           and int(hours) < 24 and int(minutes) < 60)


@dataclass(frozen=True)
class PrefetchConfig:
    """Prefetch of prior studies before the patient arrives (docs/workflow.md)."""

    enabled: bool = True
    modalities: tuple[str, ...] = field(default=("same",), metadata=_check(
        lambda v: len(v) > 0 and all(m == m.strip() and len(m) <= 16 for m in v),
        'a non-empty list of modality codes, "same" (the order\'s) or "any"'))
    body_part: str = field(default="same", metadata=_check(lambda v: v in {"same", "any"},
                                                           "same or any"))
    max_priors: int = field(default=3, metadata=_check(lambda v: 1 <= v <= 50, "1-50"))
    max_age_years: float = field(default=5.0, metadata=_check(lambda v: v >= 0,
                                                              ">= 0 years (0: any age)"))
    keep_local_days: float = field(default=7.0, metadata=_check(lambda v: v > 0, "> 0 days"))
    nightly_at: str = field(default="20:00", metadata=_check(_clock_ok,
                                                             'HH:MM (local time) or "" (off)'))
    remote_archive: str = ""
    associations: int = field(default=2, metadata=_check(lambda v: 1 <= v <= 8, "1-8"))
    retry_attempts: int = field(default=3, metadata=_check(
        lambda v: 0 <= v <= 20, "0-20 (0: only `pacs-edge prefetch retry`)"))
    retry_base_seconds: float = field(default=300.0, metadata=_check(
        lambda v: 1 <= v <= 3600, "1-3600 seconds"))


def _window_ok(value: str) -> bool:
    start, sep, end = value.partition("-")
    return value == "" or (sep == "-" and start != "" and end != ""
                           and _clock_ok(start) and _clock_ok(end) and start != end)


# Bounds of the migration's run options, which its run row keeps in SQLite INTEGER
# columns: far beyond any legacy PACS (a study every 3.6 ms; a million answers to one
# C-FIND).
MAX_RATE_PER_HOUR = 1_000_000
MAX_QUERY_LIMIT = 1_000_000


@dataclass(frozen=True)
class MigrateConfig:
    """`pacs-edge migrate`: pulling a legacy archive into the box (docs/operator-guide.md).
    Defaults of the run options; `migrate start` options override them per run."""

    via: str = field(default="move", metadata=_check(lambda v: v in {"move", "get"},
                                                      "move or get"))
    associations: int = field(default=4, metadata=_check(lambda v: 1 <= v <= 32, "1-32"))
    rate_per_hour: int = field(default=0, metadata=_check(
        lambda v: 0 <= v <= MAX_RATE_PER_HOUR,
        f"0-{MAX_RATE_PER_HOUR} studies per hour (0: no limit)"))
    window: str = field(default="", metadata=_check(
        _window_ok, '"" (any time) or HH:MM-HH:MM (local time, may span midnight)'))
    query_limit: int = field(default=500, metadata=_check(lambda v: 2 <= v <= MAX_QUERY_LIMIT,
                                                          f"2-{MAX_QUERY_LIMIT} answers"))
    max_attempts: int = field(default=5, metadata=_check(lambda v: 1 <= v <= 100, "1-100"))
    retry_base_seconds: float = field(default=60.0, metadata=_check(lambda v: v > 0,
                                                                    "> 0 seconds"))
    legacy_probe_seconds: float = field(default=5.0, metadata=_check(lambda v: 0 < v <= 60,
                                                                      "> 0 and at most 60 seconds"))


@dataclass(frozen=True)
class AuthConfig:
    """Web users: passwords, lock-out, sessions and launch links (docs/web.md)."""

    min_password_length: int = field(default=12, metadata=_check(lambda v: 8 <= v <= 1024,
                                                                 "8-1024 characters"))
    max_failed_logins: int = field(default=5, metadata=_check(lambda v: 1 <= v <= 100, "1-100"))
    lockout_minutes: float = field(default=15.0, metadata=_check(
        lambda v: 0 < v <= 527040, "> 0 and at most 527040 minutes (366 days)"))
    failed_logins_per_address: int = field(default=20, metadata=_check(
        lambda v: 0 <= v <= 100_000, "0 (off) to 100000"))
    session_idle_minutes: float = field(default=30.0, metadata=_check(lambda v: v > 0,
                                                                      "> 0 minutes"))
    session_max_hours: float = field(default=12.0, metadata=_check(
        lambda v: 0 < v <= 8784, "> 0 and at most 8784 hours (366 days)"))
    link_max_ttl_minutes: float = field(default=60.0, metadata=_check(
        lambda v: 0 < v <= 10080, "> 0 and at most 10080 minutes (a week)"))


@dataclass(frozen=True)
class LogConfig:
    level: str = field(
        default="info",
        metadata=_check(lambda v: v in {"debug", "info", "warning", "error"},
                        "one of debug, info, warning, error"),
    )


@dataclass(frozen=True)
class Config:
    home: Path
    dicom: DicomConfig = DicomConfig()
    hl7: Hl7Config = Hl7Config()
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    store: StoreConfig = StoreConfig()
    index: IndexConfig = IndexConfig()
    dropfolder: DropFolderConfig = DropFolderConfig()
    cloud: CloudConfig = CloudConfig()
    sync: SyncConfig = SyncConfig()
    audit: AuditConfig = AuditConfig()
    workflow: WorkflowConfig = WorkflowConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    migrate: MigrateConfig = MigrateConfig()
    auth: AuthConfig = AuthConfig()
    log: LogConfig = LogConfig()

    @property
    def cloud_url(self) -> str:
        """The blob store URL; the default is a local folder inside the data home."""
        return self.cloud.url or f"file://{self.home / 'cloud'}"

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def peers_path(self) -> Path:
        return self.home / PEERS_FILE

    def with_overrides(self, **sections: dict[str, Any]) -> Config:
        """Return a copy with CLI overrides (`dicom={"port": 1}`), validated like TOML."""
        updated: dict[str, Any] = {}
        for name, values in sections.items():
            values = {k: v for k, v in values.items() if v is not None}
            if values:
                current = dataclasses.asdict(getattr(self, name))
                current.update(values)
                try:
                    updated[name] = _build(type(getattr(self, name)), current, name,
                                           "the command line")
                except ConfigError as exc:
                    exc.hint = "fix the option's value and run the command again"
                    raise
        return dataclasses.replace(self, **updated)


_SECTIONS: dict[str, type] = {
    "dicom": DicomConfig,
    "hl7": Hl7Config,
    "http": HttpConfig,
    "metrics": MetricsConfig,
    "store": StoreConfig,
    "index": IndexConfig,
    "dropfolder": DropFolderConfig,
    "cloud": CloudConfig,
    "sync": SyncConfig,
    "audit": AuditConfig,
    "workflow": WorkflowConfig,
    "prefetch": PrefetchConfig,
    "migrate": MigrateConfig,
    "auth": AuthConfig,
    "log": LogConfig,
}


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """`--home`, else $PACS_EDGE_HOME, else ./data."""
    chosen = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(chosen).expanduser().absolute()


def load_config(home: Path) -> Config:
    """Load `<home>/pacs-edge.toml`; a missing home is an error with a hint."""
    path = home / CONFIG_FILE
    if path.is_dir():  # `init` keeps what exists: its hint would loop
        raise HomeError(f"{path} is a folder, not the config file",
                        hint="move it away, then run `pacs-edge init --home"
                        f" {home}` to write the config")
    if not path.is_file():
        raise HomeError(
            f"no data home at {home} (missing {CONFIG_FILE})",
            hint=f"run `pacs-edge init --home {home}` first",
        )
    return config_from_mapping(home, read_toml(path), source=str(path))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's table; a ConfigError naming the file when it is not UTF-8 or not
    TOML (OSError as it comes)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.not_toml(str(path), str(exc)) from exc


def not_utf8(path: Path, exc: UnicodeDecodeError) -> ConfigError:
    """The error for a TOML file that is not UTF-8: the bad byte and its offset, never
    the text around it (it may hold anything)."""
    error = ConfigError(str(path), "<file>", f"UTF-8 text (byte 0x{exc.object[exc.start]:02x}"
                        f" at offset {exc.start} is not UTF-8)")
    error.hint = f"save {path.name} as UTF-8 text and run `pacs-edge config check`"
    return error


def config_from_mapping(home: Path, raw: dict[str, Any], *, source: str = "") -> Config:
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise ConfigError.unknown(name, _SECTIONS, source=source)
        if not isinstance(values, dict):
            raise ConfigError(name, values, "a [table]", source=source)
        sections[name] = _build(_SECTIONS[name], values, name, source)
    config = Config(home=home, **sections)
    return dataclasses.replace(
        config,
        store=dataclasses.replace(config.store, path=_under(home, config.store.path)),
        index=dataclasses.replace(config.index, path=_under(home, config.index.path)),
        dropfolder=dataclasses.replace(
            config.dropfolder, paths=tuple(_under(home, p) for p in config.dropfolder.paths)
        ),
        cloud=dataclasses.replace(
            config.cloud,
            credentials_file=_under(home, config.cloud.credentials_file)
            if config.cloud.credentials_file else None,
        ),
    )


def _under(home: Path, path: Path) -> Path:
    return path if path.is_absolute() else home / path


def _build(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError.unknown(dotted, fields, source=source)
        kwargs[key] = _coerce(dotted, value, hints[key], fields[key].metadata, source)
    return cls(**kwargs)


# The largest number a float setting takes (a billion: 31 years in seconds), so that a
# duration added to a clock stays a date Python and the OS can hold.
MAX_NUMBER = 1e9
_A_KIND = {bool: "true or false", int: "an integer",
           float: f"a finite number, at most {MAX_NUMBER:,.0f}", str: "a string"}


def _coerce(key: str, value: Any, kind: Any, meta: Any, source: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:  # TOML has inf and nan: neither is a duration, a size or a rate
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and abs(value) <= MAX_NUMBER)
        value = float(value) if ok else value
    elif kind == Path | None:
        ok = value is None or isinstance(value, str | Path)
        value = Path(value).expanduser() if ok and value not in (None, "") else (
            None if ok else value)
    elif kind is Path:
        ok = isinstance(value, str | Path) and str(value) != ""
        value = Path(value).expanduser() if ok else value
    elif kind == tuple[str, ...]:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value)
        value = tuple(value) if ok else value
    elif kind == tuple[Path, ...]:
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, str | Path) and str(v) for v in value
        )
        value = tuple(Path(v).expanduser() for v in value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = ("a list of paths" if kind == tuple[Path, ...]
                    else "a list of strings" if kind == tuple[str, ...]
                    else _A_KIND.get(kind, "a path"))
        raise ConfigError(key, value, expected, source=source)
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(key, value, meta["expected"], source=source)
    return value


_COMMENTS = {
    "dicom": "DICOM network service (DIMSE).",
    "dicom.ae_title": "This box's AE title; peers must call it by this name.",
    "dicom.host": "Listen address. 127.0.0.1 keeps the box private; 0.0.0.0 opens it to the LAN.",
    "dicom.port": "DICOM port (104 is the standard one and needs CAP_NET_BIND_SERVICE).",
    "dicom.plain_enabled": "Listen on the plain (unencrypted) port as well as the TLS one.",
    "dicom.tls_port": "DICOM TLS port (2762 is the standard one); 0 turns TLS off.",
    "dicom.tls_require_client_cert": "Mutual TLS: peers need a certificate from the site CA"
    " (pacs-edge certs issue).",
    "dicom.tls_handshake_timeout": "Seconds a TLS client has to finish its handshake.",
    "dicom.max_pdu": "Largest PDU we accept, bytes; larger PDUs mean fewer round trips.",
    "dicom.max_associations": "Concurrent associations before new ones are rejected (busy).",
    "dicom.idle_connection_limit": "Connections that have not asked for an association yet;"
    " beyond it the oldest is closed.",
    "dicom.connections_per_address": "Open connections allowed from one remote address.",
    "dicom.workers": "Processes accepting on the port (SO_REUSEPORT); >1 uses more cores."
                     " Default: one per two cores, 1 to 4.",
    "dicom.acse_timeout": "Seconds to wait for association negotiation messages.",
    "dicom.dimse_timeout": "Seconds to wait for a DIMSE message on an open association.",
    "dicom.network_timeout": "Seconds of network silence before an association is dropped.",
    "dicom.connect_timeout": "Seconds to connect to a C-MOVE destination.",
    "dicom.suboperation_timeout": "Seconds to wait for a C-STORE response during C-MOVE.",
    "dicom.suboperation_retries": "Retries of a C-MOVE sub-operation on a fresh association.",
    "dicom.extra_storage_classes": "SOP Class UIDs stored besides the standard storage classes:"
    " the private classes a modality or a legacy PACS sends (docs/conformance.md).",
    "hl7": "HL7 v2 orders and patient updates from the RIS over MLLP (docs/workflow.md).",
    "hl7.port": "MLLP port (2575 is the usual one); 0 turns the listener off.",
    "hl7.host": "Listen address (0.0.0.0 opens it to the LAN). Senders need a peer with"
    " permission hl7 for their host.",
    "hl7.tls": "MLLP over TLS with the site CA's certificates (as DICOM TLS).",
    "hl7.tls_require_client_cert": "With tls: senders need a certificate from the site CA.",
    "hl7.max_message_bytes": "Larger messages are answered AR and the connection is closed.",
    "hl7.idle_timeout": "Seconds a connection may stay silent, before a message or inside"
    " one.",
    "hl7.message_timeout": "Seconds a message may take from its first byte to its end (a"
    " sender trickling bytes is cut off).",
    "hl7.max_connections": "Open MLLP connections; beyond it the longest-idle one is closed.",
    "hl7.unnamed_charset": "Character set of messages whose MSH-18 names none (the standard"
    " says ASCII; a RIS that sends Latin-1 so needs 8859/1); their ACKs are in it too.",
    "hl7.processing_ids": "MSH-11 values whose orders are applied (P: production; a test"
    " box may add T, training, and D, debugging); others get AR. An empty MSH-11 is P.",
    "http": "HTTPS server: DICOMweb at /dicom-web, the viewer and its login (docs/web.md).",
    "http.port": "HTTPS port; 0 turns the web server off.",
    "http.host": "Listen address. 127.0.0.1 keeps it private (or behind a reverse proxy);"
    " 0.0.0.0 opens it to the LAN.",
    "http.max_connections": "Open connections at most; beyond it new ones are closed at once.",
    "http.connections_per_address": "Open connections from one address at most (behind a"
    " reverse proxy or a terminal server, every client shares one: raise it).",
    "http.max_request_mb": "Largest request body (a STOW-RS upload), MB; larger ones get 413.",
    "http.idle_timeout": "Seconds a kept-alive connection may sit idle, and a request body"
    " may stall, before it is closed.",
    "http.head_timeout": "Seconds a client has to send a request's line and headers"
    " (slow-header attacks are dropped).",
    "http.viewer_root": "The OHIF viewer served at /: \"auto\" = what scripts/install-ohif.sh"
    " installed (.cache/ohif/), a folder holding a build, or \"\" = no viewer.",
    "http.metadata_cache_mb": "Bound of the series metadata cache (cache/metadata), MB; the"
    " series used least recently are dropped first and rebuilt when asked again.",
    "http.recall_wait_seconds": "How long a DICOMweb read of an evicted study waits for its"
    " recall before answering 503 + Retry-After (the recall goes on; the viewer waits and"
    " reopens the study).",
    "http.qido_max_results": "Matches in one QIDO-RS answer at most, whatever its limit asks;"
    " a Warning: 299 header says more follow (ask again with a larger offset).",
    "metrics": "Prometheus metrics at /metrics, /healthz and /readyz (docs/operations.md).",
    "metrics.enabled": "Count events and serve /metrics (no patient data, no UIDs).",
    "metrics.allow": "Addresses or networks that may read /metrics on the HTTPS port"
    " (a Prometheus server); others get 403.",
    "metrics.host": "With [http] port = 0: address of a plain-HTTP listener of its own for"
    " /metrics, /healthz and /readyz (loopback keeps it private).",
    "metrics.port": "Its port (9464); 0: none. Unused while the HTTPS server runs.",
    "store": "Local instance files.",
    "store.path": "Folder of instance files (relative paths are inside the data home).",
    "store.reserve_mb": "Refuse new instances (0xA700), and recalls, when free space drops"
    " below this: the room the index, the audit log and eviction need (0 leaves none).",
    "store.max_inflated_mb": "Refuse (0xA700) a deflated instance that inflates beyond this"
    " (deflate bombs); the header is read in bounded chunks whatever the size.",
    "index": "SQLite index (WAL mode, synchronous=FULL).",
    "index.path": "Index database file (relative paths are inside the data home).",
    "index.commit_window_ms": "Extra wait to batch stores; at 0, stores that arrive during a"
    " commit share the next one.",
    "dropfolder": "Drop-folder ingest: files written into these folders are ingested.",
    "dropfolder.enabled": "Watch the folders while `serve` runs.",
    "dropfolder.paths": "Folders to watch, recursively (relative paths are inside the data home).",
    "dropfolder.stable_seconds": "A file is ingested once its size and mtime held this long.",
    "dropfolder.rescan_seconds": "Full rescan interval, for file systems without events (NFS/SMB).",
    "dropfolder.after_ingest": "delete the original, or move it to <folder>.done/ beside the"
    " folder.",
    "cloud": "Where encrypted study packs go. Credentials never live in this file.",
    "cloud.url": "\"\" = <home>/cloud (local folder); file:///PATH (e.g. a NAS); azure://CONTAINER.",
    "cloud.credentials_file": "For azure://: a 0600 file holding the connection string (else"
    " $AZURE_STORAGE_CONNECTION_STRING).",
    "sync": "The sync agent (`pacs-edge sync`): replicate, evict, lifecycle, recall.",
    "sync.stable_after_seconds": "A study is replicated once no instance arrived for this long.",
    "sync.replicate_interval_seconds": "How often the agent looks for studies to replicate/evict.",
    "sync.evict_after_days": "Evict replicated studies not accessed for this long (0: never).",
    "sync.disk_high_watermark_percent": "Above this disk use (bytes or inodes), evict least"
    " recently used first...",
    "sync.disk_low_watermark_percent": "...until that use is below this.",
    "sync.cool_after_days": "Move packs to the Cool tier after this many days (0: never).",
    "sync.cold_after_days": "Move packs to the Cold tier after this many days (0: never).",
    "sync.archive_after_days": "Move packs to Archive after this many days (0: never; recall"
    " from Archive takes hours).",
    "sync.segment_size": "Encryption segment size in bytes (range reads fetch whole segments).",
    "sync.recall_poll_seconds": "How often the agent picks up recall requests from the appliance.",
    "sync.rehydrate_poll_seconds": "How often to check an archived pack being brought online"
    " (also the Retry-After of a DICOMweb read that waits for one).",
    "sync.rehydrate_priority": "Azure priority of a recall's rehydration out of Archive:"
    " standard (up to 15 h) or high (under an hour for most packs, at a higher price).",
    "sync.recall_timeout_seconds": "How long a C-MOVE/C-GET waits for a recall before failing.",
    "sync.evict_without_escrow": "Evict even before the site key is escrowed (`keys escrow`):"
    " a lost box then loses every evicted study.",
    "sync.scrub_fraction_per_day": "Share of the cloud packs read back and verified per day"
                                   " (0.01: each pack every ~100 days; 0: off).",
    "audit": "Audit trail: <home>/audit/audit.log (0600, hash-chained; holds PHI by design).",
    "audit.site_id": "AuditEnterpriseSiteID in every audit message (e.g. the hospital's name).",
    "audit.flush_seconds": "Audit records are written at association end or after this long.",
    "audit.batch_seconds": "Import and drop-folder ingest: one audit record per study per window.",
    "audit.rejection_window_seconds": "Rejected associations: one full record per address per"
    " window, then one count.",
    "audit.access_window_seconds": "Web access (DICOMweb, viewer): one record per user, study,"
                                   " address and kind of access per window, then a count.",
    "audit.anchor_interval_seconds": "How often the sync agent anchors the log head in the cloud.",
    "audit.syslog_host": "Forward audit records to this syslog collector over TLS (\"\": off).",
    "audit.syslog_port": "Collector port (6514 is syslog over TLS).",
    "audit.syslog_ca_file": "CA certificate(s) that signed the collector's certificate"
    " (\"\": the system's).",
    "audit.syslog_cert_file": "Client certificate for mutual TLS (\"\": none).",
    "audit.syslog_key_file": "Its private key, a 0600 file.",
    "audit.syslog_retry_seconds": "While the collector is down, retry this often.",
    "workflow": "Storage Commitment, MPPS and Modality Worklist (docs/workflow.md).",
    "workflow.commit_requires_cloud": "Commit an instance only once it is also in a verified"
    " cloud pack (the report waits for the sync agent).",
    "workflow.commit_cloud_wait_hours": "With commit_requires_cloud: instances not in a verified"
    " pack after this long are reported failed (0x0110).",
    "workflow.commit_retry_seconds": "Retry interval for a commitment report the requesting"
    " peer did not take.",
    "workflow.commit_give_up_hours": "Stop trying to deliver a commitment report after this long.",
    "workflow.worklist_past_days": "A worklist query naming no scheduled start date gets the"
    " steps scheduled from this many days ago on, and those without a date (0: no bound).",
    "prefetch": "Prefetch of prior studies when an order arrives, and nightly for tomorrow's"
    " worklist (docs/workflow.md).",
    "prefetch.enabled": "Prefetch priors for new orders and tomorrow's worklist.",
    "prefetch.modalities": "Priors of these modalities: \"same\" = the order's, \"any\", or"
    " codes such as \"CT\", \"MR\".",
    "prefetch.body_part": "same: only priors of the body part the order's procedure names"
    " (when it names one); any: every body part.",
    "prefetch.max_priors": "The newest matching priors, at most this many per order.",
    "prefetch.max_age_years": "Priors older than this are not fetched (0: any age).",
    "prefetch.keep_local_days": "Prefetched priors are not evicted until this long after the"
    " scheduled time.",
    "prefetch.nightly_at": "Local time of the nightly run for tomorrow's worklist (\"\": off).",
    "prefetch.remote_archive": "Name of the peer (with a port and permission store) that the"
    " box C-FINDs and C-MOVEs priors from when it does not hold them (\"\": none).",
    "prefetch.associations": "Remote priors C-MOVEd at once, each on its own association to"
    " the remote archive (oldest need first).",
    "prefetch.retry_attempts": "A request or prior that failed for a reason that may pass"
    " (the remote archive down, a C-MOVE or recall failed) is tried again this many times"
    " (0: only `pacs-edge prefetch retry`)...",
    "prefetch.retry_base_seconds": "...the first this long after the failure, then doubled"
    " each time, at most an hour.",
    "migrate": "`pacs-edge migrate`: pull a legacy PACS into the box (docs/operator-guide.md);"
    " the defaults of `migrate start`'s options.",
    "migrate.via": "move: C-MOVE each study to this box (the legacy PACS must know this box's"
    " AE title, host and port); get: C-GET it over the migration's own association.",
    "migrate.associations": "Studies transferred at once, one association to the legacy PACS"
    " each.",
    "migrate.rate_per_hour": "Start at most this many studies per hour (0: no limit).",
    "migrate.window": "Transfer only in this local time window, e.g. 20:00-06:00 (\"\": any"
    " time).",
    "migrate.query_limit": "Most answers the legacy PACS gives to one C-FIND: a query that"
    " gets this many is split (by time of day, then by modality).",
    "migrate.max_attempts": "Attempts per study (and per day's query) before it is listed as"
    " failed.",
    "migrate.retry_base_seconds": "Wait before the first retry; doubled at each attempt, at"
    " most an hour.",
    "migrate.legacy_probe_seconds": "While a legacy PACS the run reached before takes no"
    " association: wait this long before trying it again, doubled each time, at most a"
    " minute (no study counts as failed meanwhile).",
    "auth": "Web users: passwords, lock-out, sessions, launch links (docs/web.md).",
    "auth.min_password_length": "Shortest password `users add` and `users passwd` accept.",
    "auth.max_failed_logins": "Consecutive failed logins that lock a user out...",
    "auth.lockout_minutes": "...for this long (`pacs-edge users unlock` ends it early).",
    "auth.failed_logins_per_address": "Failed logins from one client address, whatever the"
    " names, after which its logins are refused (429) until lockout_minutes after its"
    " first (0: off; behind a reverse proxy every client shares the proxy's address;"
    " an IPv6 client's /64 may have five times as many).",
    "auth.session_idle_minutes": "A web session ends after this long without a request...",
    "auth.session_max_hours": "...and this long after login, however active.",
    "auth.link_max_ttl_minutes": "Longest validity `pacs-edge link --ttl` may give a launch link.",
    "log": "Logging (never contains patient data).",
    "log.level": "One of debug, info, warning, error.",
}


def _default(field_: dataclasses.Field[Any]) -> Any:
    """A field's default; one that depends on the machine (dicom.workers) as computed now."""
    if field_.default_factory is not dataclasses.MISSING:
        return field_.default_factory()
    return field_.default


def render_config_toml(**overrides: dict[str, Any]) -> str:
    """The commented config file `pacs-edge init` writes: every key at its default."""
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment("pacs-edge configuration. Every key is shown at its default;"))
    doc.add(tomlkit.comment("`pacs-edge config check` validates edits."))
    for name, cls in _SECTIONS.items():
        doc.add(tomlkit.nl())
        table = tomlkit.table()
        table.comment(_COMMENTS[name])
        values = {**{f.name: _default(f) for f in dataclasses.fields(cls)},
                  **{k: v for k, v in overrides.get(name, {}).items() if v is not None}}
        for key, value in values.items():
            table.add(tomlkit.comment(_COMMENTS[f"{name}.{key}"]))
            if value is None:
                table.add(tomlkit.comment(f"{key} = \"\""))
                continue
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            table.add(key, str(value) if isinstance(value, Path) else value)
        doc.add(name, table)
    return tomlkit.dumps(doc)
