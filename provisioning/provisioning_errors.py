"""Errors of the provisioning layer, each with a hint the operator can follow.

Tree::

    PacsEdgeError                (appliance.base.errors: message + hint)
    └── ProvisioningError        base of provisioning: message + hint (always given)
        ├── KeyFileError         a secret file is missing, unsafe or malformed (path)
        ├── CertificateError     the site CA or a certificate cannot be used or made
        ├── KeyRotationError     a site key rotation cannot start or go on
        └── EscrowError          the escrow file cannot be written, read or opened

provisioning imports the base floor only (appliance.base), so its errors
derive from the appliance's PacsEdgeError: the command line shows them like any
other expected failure (appliance/cli/common.py expected_errors), and the sync
agent's callers handle them where they handle their own, with no adapter.
"""

from __future__ import annotations

from pathlib import Path

from appliance.base.errors import PacsEdgeError


class ProvisioningError(PacsEdgeError):
    """Base of every expected provisioning failure; `hint` says what to do."""

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message, hint=hint)


class KeyFileError(ProvisioningError):
    """A secret file is missing, unsafe or malformed; `hint` says what to do."""

    def __init__(self, path: Path, message: str, *, hint: str) -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = path


class CertificateError(ProvisioningError):
    pass


class KeyRotationError(ProvisioningError):
    pass


class EscrowError(ProvisioningError):
    """The escrow file cannot be written, read or opened; `hint` says what to do."""
