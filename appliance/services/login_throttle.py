"""Failed logins per client address, whatever the names: password spraying is bounded.

The lock-out (users.py) counts failures per name typed, so a client trying one common
password against many names had max_failed_logins checks of each name, every one a
full scrypt (a real run: 200 names from one address, 200 passwords checked, none
refused). AddressThrottle counts the wrong passwords checked for each client address:
after `limit` of them within `window` seconds of the first, that address's logins
are refused unchecked (AuthFailure.THROTTLED: 429 with Retry-After) until the window
has passed; the address then counts afresh.

- Only a password that was checked and wrong counts: a refusal without a check (a
  locked name, this throttle) costs the box nothing and tells the client nothing. A
  success does not reset the count, or one valid account would let a sprayer go on.
- Sessions are not touched: a browser logged in from the address goes on working.
- The address is the TCP peer's (auth.client_address). X-Forwarded-For is not trusted,
  any client could send it; behind a reverse proxy every client shares the proxy's
  address, and the operator raises [auth] failed_logins_per_address or sets it to 0.
- At most ADDRESSES addresses are kept, the least recently failed forgotten first; a
  restart forgets them all (an account's lock is kept in its row).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

log = logging.getLogger(__name__)

ADDRESSES = 10_000  # a few hundred bytes each


class AddressThrottle:
    def __init__(self, *, limit: int, window: float) -> None:
        """`limit` failures (0: no throttle) within `window` seconds of the first."""
        self.limit = limit
        self.window = window
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, since

    def retry_after(self, address: str, now: float) -> int:
        """Whole seconds until `address` may log in again; 0 if it may now. A window
        that began "after now" (the wall clock stepped back) is over."""
        failures, since = self._entries.get(address, (0, now))
        if self.limit <= 0 or failures < self.limit or not since <= now < since + self.window:
            return 0
        return max(1, math.ceil(since + self.window - now))

    def fail(self, address: str, now: float) -> None:
        """Count one wrong password checked for a login from `address`."""
        if self.limit <= 0:
            return
        failures, since = self._entries.pop(address, (0, now))
        if not since <= now < since + self.window:
            failures, since = 0, now
        failures += 1
        self._entries[address] = (failures, since)
        while len(self._entries) > ADDRESSES:
            self._entries.popitem(last=False)
        if failures == self.limit:
            log.warning("login throttled address=%s failures=%d seconds=%d", address,
                        failures, self.retry_after(address, now))
