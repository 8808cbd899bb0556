"""Errors of the provisioning layer, each with a hint the operator can follow.

Tree::

    ProvisioningError            base: message + hint
    ├── KeyFileError             a secret file is missing, unsafe or malformed (keys.py)
    ├── CertificateError         the site CA or a certificate cannot be used or made
    └── KeyRotationError         a site key rotation cannot start or go on

provisioning imports neither appliance nor sync, so these do not derive from
the appliance's PacsEdgeError; the command line maps them to the same
one-line message, hint and exit code.
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Base of every expected provisioning failure; `hint` says what to do."""

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class CertificateError(ProvisioningError):
    pass


class KeyRotationError(ProvisioningError):
    pass
