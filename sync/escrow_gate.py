"""Eviction waits for an escrow of the current site key (or an explicit override).

Evicting deletes the local copy; the cloud copy then opens only with the site
key. Until that key is escrowed (provisioning.escrow_state: `keys escrow`
leaves a record, and a key rotation makes it stale), a lost box would take
every evicted study with it. So:

- `require_escrow` (top of sync.evict.evict_study, so manual and automatic
  eviction alike) raises EvictionNeedsEscrow, naming `keys escrow`;
- `eviction_allowed` (top of sync.evict.eviction_candidates) answers False
  for the agent's pass and logs one warning per pass, not one per study;
- `late_instances_may_leave` (sync.replicate): the late instances of an
  evicted study leave local disk once uploaded, an eviction too; until the
  escrow they stay local (the study stays evicted).

`[sync] evict_without_escrow = true` (or `pacs-edge evict --without-escrow`,
which sets it for that one command) is the override for a lab that accepts
the risk. The record is read from disk on every check, so an escrow made while
the agent runs takes effect at its next pass, without a restart.
"""

from __future__ import annotations

import logging

from appliance.base.errors import PacsEdgeError
from provisioning.escrow_state import ESCROW_HINT, escrow_status
from sync.context import SyncContext

log = logging.getLogger(__name__)


class EvictionNeedsEscrow(PacsEdgeError):
    """Eviction refused: the current site key has no escrow (and no override is set)."""


def require_escrow(ctx: SyncContext) -> None:
    """Raise EvictionNeedsEscrow unless the current site key is escrowed or overridden."""
    if ctx.config.sync.evict_without_escrow:
        return
    problem = escrow_status(ctx.config.home).problem
    if problem is not None:
        raise EvictionNeedsEscrow(f"eviction refused: {problem}", hint=ESCROW_HINT)


def eviction_allowed(ctx: SyncContext) -> bool:
    """For the agent's pass: False (and one warning) while eviction needs an escrow."""
    try:
        require_escrow(ctx)
    except EvictionNeedsEscrow as exc:
        log.warning("eviction skipped this pass: %s; run `pacs-edge keys escrow`", exc.message)
        return False
    return True


def late_instances_may_leave(ctx: SyncContext) -> bool:
    """For the late instances of an evicted study, just uploaded: False (and a line) while
    eviction needs an escrow, so their files stay local."""
    try:
        require_escrow(ctx)
    except EvictionNeedsEscrow as exc:
        log.warning("late instances of an evicted study kept local: %s; run `pacs-edge keys"
                    " escrow`", exc.message)
        return False
    return True
