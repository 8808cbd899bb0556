"""`pacs-edge audit verify`: walk the chain, compare it with the anchors, name the first bad record.

Checks, line by line (line N must hold seq N):
- the line parses as an entry (seq, time, prev_hash, record, hash);
- its seq is the next one: a gap means records were removed, a smaller or
  repeated seq means records were reordered or duplicated;
- its prev_hash is the previous line's hash (removed, inserted, reordered);
- its hash is SHA-256(prev_hash + canonical body): anything else means the
  line was edited;
- the line is byte for byte the canonical form the box writes: a JSON parser
  keeps the last of two equal keys, so a forged record put in front of the
  real one would hash right yet show the forgery to anyone reading the file.
Then every anchor (anchor.py) must match: the record at the anchor's seq has
the anchored hash (else the chain was rewritten and recomputed), and the log
reaches at least that seq (else its tail was cut off).

The report names the first problem only: after one bad record nothing later
can be trusted either, and the first is where an investigation starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.audit.anchor import Anchor
from appliance.audit.log import GENESIS, AuditLog, Entry, chain_hash

# The log is never rotated: after a year it holds GBs, and the walk takes minutes (3.8 GB,
# 2.5 million records: 3 min 22 s in 69 MB). `progress` hears how far it is, this often.
PROGRESS_BYTES = 256 << 20


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line number in audit.log
    seq: int | None  # the seq the line claims, when it could be read
    reason: str

    def __str__(self) -> str:
        return f"record {self.line}: {self.reason}"


@dataclass(frozen=True)
class Report:
    records: int  # lines read up to the first problem (all of them when intact)
    head_seq: int
    head_hash: str
    anchors_checked: int
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_log(audit_log: AuditLog, anchors: Sequence[Anchor] = (), *,
               progress: Callable[[int, int], None] | None = None) -> Report:
    """Check the chain, then the anchors; stops at the first problem. `progress` gets
    (bytes checked, bytes in the log) every PROGRESS_BYTES."""
    anchored = {a.seq: a for a in anchors}
    prev_hash, count = GENESIS, 0
    total = audit_log.path.stat().st_size if audit_log.path.exists() else 0
    report_at = PROGRESS_BYTES
    for number, offset, line in audit_log.entries():
        if progress is not None and offset >= report_at:
            progress(offset, total)
            report_at = offset + PROGRESS_BYTES
        problem = _check(number, line, prev_hash, anchored)
        if isinstance(problem, Problem):
            return Report(count, count, prev_hash, len(anchors), problem)
        prev_hash, count = problem.hash, number
    beyond = sorted(seq for seq in anchored if seq > count)
    if beyond:
        anchor = anchored[beyond[-1]]
        return Report(count, count, prev_hash, len(anchors), Problem(
            count + 1, None,
            f"missing: the log ends at record {count} but was anchored at record "
            f"{anchor.seq} on {anchor.time}: its tail was cut off"))
    return Report(count, count, prev_hash, len(anchors))


def _check(number: int, line: bytes, prev_hash: str,
           anchored: dict[int, Anchor]) -> Entry | Problem:
    try:
        entry = Entry.parse(line)
    except ValueError as exc:
        return Problem(number, None, f"unreadable ({exc}): edited or damaged")
    if entry.seq > number:
        return Problem(number, entry.seq, f"holds seq {entry.seq}, expected {number}: "
                       f"{'a record was' if entry.seq == number + 1 else 'records were'}"
                       " removed before it (or the records were reordered)")
    if entry.seq < number:
        return Problem(number, entry.seq, f"holds seq {entry.seq}, expected {number}: "
                       "records were reordered or duplicated")
    if entry.prev_hash != prev_hash:
        return Problem(number, entry.seq, "its prev_hash is not the hash of the record"
                       " before it: records were removed, inserted or reordered")
    if chain_hash(entry.prev_hash, entry.seq, entry.time, entry.record) != entry.hash:
        return Problem(number, entry.seq, "its content does not match its hash: the record"
                       " was edited")
    if entry.line() != line + b"\n":
        return Problem(number, entry.seq, "its bytes are not the form the box writes (a"
                       " repeated key, reordered keys or added spaces): the record was edited")
    anchor = anchored.get(entry.seq)
    if anchor is not None and anchor.hash != entry.hash:
        return Problem(number, entry.seq, f"differs from the anchor written on {anchor.time}:"
                       " the log was rewritten (and its chain recomputed) after anchoring")
    return entry
