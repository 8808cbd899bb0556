"""When a retry is due, or a limit over, though the wall clock stepped back after it was set.

The index keeps the next attempt of a retry (a Storage Commitment report, a prefetch,
a legacy migration's day or study) as a wall-clock time. A box whose clock ran months
or years ahead and is then corrected (NTP) finds every attempt scheduled meanwhile that
far in the future: with `next_attempt <= now` alone, it would wait until the clock
caught up. No code schedules an attempt more than its `horizon` (the longest delay it
sets) ahead, so one set further ahead than that, plus STEPPED_BACK_SLACK, can only have
been set before a backward step: it is due now. The same holds for a limit that ends
at a wall-clock time (a login lock-out): one ending further ahead than the longest
limit ever set is over.
"""

from __future__ import annotations

# Seconds beyond the longest scheduled delay that only a wall clock stepped back explains
# (two threads or processes read the clock far closer together than this).
STEPPED_BACK_SLACK = 60.0


def due_condition(column: str, now: float, horizon: float) -> tuple[str, tuple[float, float]]:
    """The SQL condition that the time in `column` is due at `now`, and its two
    parameters. `horizon`: the longest delay ever scheduled into `column`; a time later
    than `now + horizon + STEPPED_BACK_SLACK` predates a backward step and is due. A NULL
    time (no attempt scheduled) is never due."""
    return f"({column} <= ? OR {column} > ?)", (now, now + horizon + STEPPED_BACK_SLACK)


def still_ahead(until: float, now: float, longest: float) -> bool:
    """Whether a limit ending at `until` still holds at `now`: it has not ended, and it
    ends no further ahead than `longest` (the longest such limit ever set) plus
    STEPPED_BACK_SLACK, which only a wall clock stepped back since it was set explains."""
    return now < until <= now + longest + STEPPED_BACK_SLACK
