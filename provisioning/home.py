"""Create a data home, idempotently: folders, config file and secrets.

Nothing that exists is ever overwritten: running `init` again reports that
the home is unchanged. Secrets are files with mode 0600 in a 0700 folder.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from appliance.base.durable import write_file

SECRETS_DIR = "secrets"
LOG_KEY = "log.key"
AUDIT_KEY = "audit.key"  # the audit anchors' HMAC key, made on first use (escrowed)


@dataclass
class InitReport:
    home: Path
    created: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created)


def init_home(home: Path, *, config_file: str, config_text: str,
              extra_files: dict[str, str] | None = None) -> InitReport:
    """Create `home` with the config text, extra text files and the log key; keep what exists."""
    report = InitReport(home)
    for folder, mode in ((home, 0o750), (home / SECRETS_DIR, 0o700), (home / "store", 0o750)):
        if not folder.exists():
            folder.mkdir(parents=True, mode=mode)
            folder.chmod(mode)  # the mode asked for, whatever the umask (0077 in pacs-edge)
            report.created.append(f"{folder}/")
    _create_file(home / config_file, config_text.encode(), 0o640, report)
    for name, text in (extra_files or {}).items():
        _create_file(home / name, text.encode(), 0o640, report)
    _create_file(home / SECRETS_DIR / LOG_KEY, secrets.token_bytes(32), 0o600, report)
    return report


def _create_file(path: Path, data: bytes, mode: int, report: InitReport) -> None:
    """Create `path` unless it exists; never overwrite (a concurrent init may have won)."""
    if write_file(path, data, mode):
        report.created.append(str(path))
