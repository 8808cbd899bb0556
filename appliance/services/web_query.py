"""QIDO-RS searches: C-FIND's matching, the web user's scope, then paging.

The edge (appliance/http/dicomweb_qido.py) turns the query string into a C-FIND
identifier; this service answers it with `query.find.answer`, so QIDO-RS and
C-FIND match exactly alike (PS3.4 C.2.2.2: wildcards, ranges, UID lists), then
keeps only the studies the Principal may see, and only then applies
`offset` and `limit` (paging after scoping: a referring physician's page is
full of their own studies, and counts reveal nothing of the others).

Scope needs each match's Referring Physician's Name: when the user is scoped
and did not ask for it, the key is added to the identifier and removed from
the answers again. Scope and paging work on the index rows; only the page's
rows become identifiers (a search of every study builds `limit` Datasets, not
one per study).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from appliance.services.access import Principal
from appliance.services.query.find import QueryModel, answer
from appliance.store.index import Index

_REFERRING = Tag(0x0008, 0x0090)


@dataclass(frozen=True)
class Page:
    matches: list[Dataset]
    total: int  # in-scope matches before offset/limit
    truncated: bool  # more in-scope matches follow this page


class WebQueryService:
    def __init__(self, index: Index, *, retrieve_ae_title: str = "") -> None:
        self.index = index
        self.retrieve_ae_title = retrieve_ae_title

    async def search(self, principal: Principal, identifier: Dataset, *, offset: int = 0,
                     limit: int | None = None) -> Page:
        """The page of in-scope matches; raises QueryError for an identifier C-FIND
        would refuse (the edge answers 400)."""
        added = False
        if not principal.sees_all() and _REFERRING not in identifier:
            identifier.ReferringPhysicianName = ""
            added = True
        found = await answer(self.index, QueryModel.STUDY_ROOT, identifier,
                             retrieve_ae_title=self.retrieve_ae_title)
        rows = found.rows
        if not principal.sees_all():
            referring = found.column(_REFERRING)
            rows = [row for row in rows if principal.may_see(str(row[referring] or ""))]
        total = len(rows)
        end = total if limit is None else offset + limit
        matches = found.datasets(rows[offset:end])  # identifiers for the page alone
        if added:
            for match in matches:
                del match[_REFERRING]
        return Page(matches, total, end < total)
