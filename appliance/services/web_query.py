"""QIDO-RS searches: C-FIND's matching, the web user's scope, then paging.

The edge (appliance/http/dicomweb_qido.py) turns the query string into a C-FIND
identifier; this service answers it with `query.find.answer`, so QIDO-RS and
C-FIND match exactly alike (PS3.4 C.2.2.2: wildcards, ranges, UID lists), then
keeps only the studies the Principal may see, and only then applies
`offset` and `limit` (paging after scoping: a referring physician's page is
full of their own studies, and counts reveal nothing of the others). A page
holds at most `max_results` matches (`[http] qido_max_results`), whatever
`limit` asks: PS3.18 lets the origin server cap a page and say with
`Warning: 299` that more follow, and a search of every instance would
otherwise build an answer the size of the index.

Scope is each match's Referring Physician's Name, read beside the match
whether or not it is a returned key. Scope and paging are applied while the
index is read (query.find.Paging): only the page's rows are held, and they
become identifiers one at a time as the edge writes them (`Page.identifiers`):
a Dataset costs ~12 KB while it lives, a page 5000 of them. Pages are in the
order the index recorded the matches, so a client paging with `offset` sees
each match once, and one recorded meanwhile (an instance of a study still
arriving) on a later page.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from appliance.services.access import Principal
from appliance.services.query.find import Answer, Paging, QueryModel, Row, answer
from appliance.store.index import Index

_REFERRING = Tag(0x0008, 0x0090)


@dataclass(frozen=True)
class Page:
    """The rows of one page, each made an identifier only when asked for."""

    found: Answer
    rows: Sequence[Row]
    truncated: bool  # more in-scope matches follow this page

    def __len__(self) -> int:
        return len(self.rows)

    def identifiers(self) -> Iterator[Dataset]:
        for row in self.rows:
            yield self.found.dataset(row)


class WebQueryService:
    def __init__(self, index: Index, *, max_results: int,
                 retrieve_ae_title: str = "") -> None:
        self.index = index
        self.max_results = max_results
        self.retrieve_ae_title = retrieve_ae_title

    async def search(self, principal: Principal, identifier: Dataset, *, offset: int = 0,
                     limit: int | None = None) -> Page:
        """The page of in-scope matches; raises QueryError for an identifier C-FIND
        would refuse (the edge answers 400)."""
        size = self.max_results if limit is None else min(limit, self.max_results)
        scope = None if principal.sees_all() else (
            _REFERRING, lambda value: principal.may_see(str(value or "")))
        found = await answer(self.index, QueryModel.STUDY_ROOT, identifier,
                             retrieve_ae_title=self.retrieve_ae_title,
                             paging=Paging(offset, size + 1, scope))  # one more: any left?
        return Page(found, found.rows[:size], len(found.rows) > size)
