"""Who a web request acts for, and which studies that person may see.

A Principal is what authentication (password, session cookie, launch link) yields;
every service that reads patient data for the web takes one and applies `may_see`
per study. Scoping is a service rule, not an edge rule: QIDO, WADO and the viewer
share it, so a referring physician cannot reach a study through a route that forgot
the check (an out-of-scope study answers 404 at the edge, never 403).

Roles:
    admin        sees every study and the box's status page; stores (STOW-RS)
    radiologist  sees every study; stores (STOW-RS)
    referring    sees only the studies whose Referring Physician's Name matches
                 the user's `referring_name`
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from appliance.store.person_names import fold


class Role(enum.StrEnum):
    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    REFERRING = "referring"


def person_name_key(value: str) -> tuple[str, ...]:
    """A DICOM PN reduced to what two spellings of one name share.

    Only the alphabetic group counts (the part before the first '='); components are
    compared stripped of padding, in the form person-name matching compares
    (store.person_names.fold: case-folded, Unicode NFC), and empty trailing components
    are dropped, so 'Doe^John' equals 'DOE^JOHN^^' and 'DOE^JOHN=ドウ^ジョン', and a
    'Müller' typed with a composed 'ü' equals one stored decomposed.
    """
    alphabetic = value.split("=", 1)[0]
    parts = [fold(part.strip()) for part in alphabetic.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class Principal:
    name: str            # the user name
    role: Role
    referring_name: str  # 'LAST^FIRST' for REFERRING users, "" otherwise

    def sees_all(self) -> bool:
        """Admins and radiologists read every study on the box."""
        return self.role in (Role.ADMIN, Role.RADIOLOGIST)

    def may_store(self) -> bool:
        """Storing needs a role that sees every study: a new instance may belong to a
        study outside a referring user's scope, which they must not learn of."""
        return self.sees_all()

    def may_administer(self) -> bool:
        """Admins see the box's status page (no patient data on it)."""
        return self.role is Role.ADMIN

    def may_see(self, referring_physician: str) -> bool:
        """Whether a study whose Referring Physician's Name is `referring_physician` is in
        scope. A referring user with no name to match, or a study with none, matches
        nothing: an empty value never widens the scope."""
        if self.sees_all():
            return True
        own = person_name_key(self.referring_name)
        return bool(own) and own == person_name_key(referring_physician)
