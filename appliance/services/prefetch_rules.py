"""Which prior studies a prefetch fetches: the `[prefetch]` rules, as pure functions.

A radiologist reads today's study next to the patient's relevant earlier
ones: the same kind of imaging of the same part of the body, the newest
first, a few of them, not decades old. The rules, in order:

1. never the ordered study itself, and a study once (a study in the index
   wins over the same study found in the remote archive);
2. modality: ``modalities`` lists codes, ``"same"`` (the order's modality; an
   order without one matches every modality) or ``"any"``; a prior matches
   when one of its modalities is wanted;
3. body part (``body_part = "same"``): the order's region is the one its
   procedure text names ("CT HEAD W/O" -> head); a prior matches when the
   region of one of its series' Body Part Examined values, or else of its
   study description, is that region. Missing data never excludes: an order
   that names no region, or a prior with no body part and a description that
   names none, matches;
4. age: a prior dated more than ``max_age_years`` before today is left out
   (0: any age); a prior without a date is kept, after the dated ones;
5. the newest ``max_priors`` of what is left.

Regions group the words sites use for one part of the body (BRAIN and HEAD,
THORAX and CHEST...): DICOM's Body Part Examined terms (PS3.16 CID 4031)
and the words RIS procedure names use for them.
"""

from __future__ import annotations

import re
from calendar import monthrange
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import MINYEAR, date, timedelta

from appliance.base.config import PrefetchConfig
from appliance.store.prefetch_rows import Source

# A word may name two regions: the lumbar spine is spine and lies in the abdomen.
_REGIONS: dict[str, tuple[str, ...]] = {
    "head": ("HEAD", "BRAIN", "SKULL", "CRANIUM", "IAC", "ORBIT", "SINUS", "FACE"),
    "neck": ("NECK", "CSPINE", "THYROID", "LARYNX"),
    "chest": ("CHEST", "THORAX", "LUNG", "LUNGS", "HEART", "RIBS", "TSPINE", "BREAST"),
    "abdomen": ("ABDOMEN", "ABD", "LIVER", "KIDNEY", "PANCREAS", "LSPINE", "ABDOMENPELVIS"),
    "pelvis": ("PELVIS", "HIP", "SACRUM", "SSPINE", "BLADDER", "PROSTATE", "ABDOMENPELVIS"),
    "upper limb": ("SHOULDER", "ARM", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER",
                   "CLAVICLE", "HUMERUS"),
    "lower limb": ("KNEE", "LEG", "FEMUR", "ANKLE", "FOOT", "TOE", "TIBIA", "CALF"),
    "spine": ("SPINE", "WHOLESPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE"),
}
_REGION_OF: dict[str, set[str]] = {}
for _region, _words in _REGIONS.items():
    for _word in _words:
        _REGION_OF.setdefault(_word, set()).add(_region)
_WORD = re.compile(r"[A-Z]+")


@dataclass(frozen=True)
class Candidate:
    """A study of the patient that could be a prior, wherever it is."""

    study_uid: str
    study_date: str                  # YYYYMMDD, '' unknown
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]      # Body Part Examined of its series
    description: str
    source: Source


@dataclass(frozen=True)
class OrderContext:
    """What the rules read from the order (a manual request has none of it)."""

    modality: str = ""
    procedure: str = ""
    exclude_study_uid: str = ""


def regions(text: str) -> set[str]:
    """The body regions a Body Part Examined value or a procedure text names."""
    upper = text.upper()
    found: set[str] = set()
    for word in _WORD.findall(upper):
        found |= _REGION_OF.get(word, set())
    # "ABDOMEN PELVIS" -> ABDOMENPELVIS, "WHOLE SPINE", "L-SPINE" -> LSPINE
    found |= _REGION_OF.get(re.sub(r"[^A-Z]", "", upper), set())
    return found


def wanted_modalities(rules: PrefetchConfig, order: OrderContext) -> set[str] | None:
    """The modality codes a prior may have; None: any."""
    wanted: set[str] = set()
    for entry in rules.modalities:
        code = entry.upper()
        if code == "ANY":
            return None
        if code == "SAME":
            if not order.modality:
                return None
            wanted.add(order.modality.upper())
        else:
            wanted.add(code)
    return wanted


def _modality_ok(candidate: Candidate, wanted: set[str] | None) -> bool:
    if wanted is None or not candidate.modalities:
        return True
    return bool(wanted & {m.upper() for m in candidate.modalities})


def _body_part_ok(candidate: Candidate, region: set[str]) -> bool:
    if not region:
        return True
    named: set[str] = set()
    for part in candidate.body_parts:
        named |= regions(part)
    if not named:
        named = regions(candidate.description)
    return not named or bool(named & region)


def _parse_date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None


def _oldest(today: date, years: float) -> date | None:
    """The oldest study date `years` before `today` keeps: whole years by the calendar (a
    prior of the same day three years back is three years old, whatever 29 Februaries lie
    between; from a 29 February, the 28th), a fraction as days of an average year. None
    (any age) for 0, or for an age reaching back before the calendar's first year."""
    whole = int(years)
    if years <= 0 or today.year - whole < MINYEAR:
        return None
    year = today.year - whole
    back = date(year, today.month, min(today.day, monthrange(year, today.month)[1]))
    try:
        return back - timedelta(days=round((years - whole) * 365.25))
    except OverflowError:
        return None


def _unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    """One candidate per study; the index's (local or cloud) before the remote archive's."""
    chosen: dict[str, Candidate] = {}
    for candidate in candidates:
        known = chosen.get(candidate.study_uid)
        if known is None or (known.source is Source.REMOTE
                             and candidate.source is not Source.REMOTE):
            chosen[candidate.study_uid] = candidate
    return list(chosen.values())


def choose_priors(candidates: Sequence[Candidate], order: OrderContext, rules: PrefetchConfig,
                  *, today: date) -> list[Candidate]:
    """The priors to fetch, newest first (see the module docstring for the rules)."""
    wanted = wanted_modalities(rules, order)
    region = regions(order.procedure) if rules.body_part == "same" else set()
    oldest = _oldest(today, rules.max_age_years)
    kept: list[tuple[date | None, Candidate]] = []
    for candidate in _unique(candidates):
        if candidate.study_uid == order.exclude_study_uid:
            continue
        if not _modality_ok(candidate, wanted) or not _body_part_ok(candidate, region):
            continue
        when = _parse_date(candidate.study_date)
        if oldest is not None and when is not None and when < oldest:
            continue
        kept.append((when, candidate))
    # Newest first; undated after the dated ones; the UID settles ties, so a run is stable.
    kept.sort(key=lambda item: (item[0] is None, -(item[0] or date.min).toordinal(),
                                item[1].study_uid))
    return [candidate for _, candidate in kept[:rules.max_priors]]
