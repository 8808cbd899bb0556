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
- While an address is refused, the right password is refused too, unchecked: to let
  it in, every guess would have to be checked again and answered (429 or admitted),
  and the throttle would bound nothing. Sessions are not touched: a browser logged in
  from the address goes on working.
- The address is the TCP peer's (auth.client_address). X-Forwarded-For is not trusted,
  any client could send it; behind a reverse proxy every client shares the proxy's
  address, and the operator raises [auth] failed_logins_per_address or sets it to 0.
- An IPv4-mapped IPv6 address (::ffff:192.0.2.7, from a dual-stack socket) is its
  IPv4 address. An IPv6 host is given a whole /64 and may use a fresh address of it
  for every try (privacy addresses, or any it picks): a failure counts against the
  address and against its /64, which may have HOSTS_PER_NETWORK times `limit`. Before,
  each fresh address had a count of its own (a real run: 40 addresses of one /64, 40
  passwords checked against a limit of 4). The /64 is also a LAN segment's hosts, so
  it gets more than one host: one host at its limit does not shut out its neighbours.
- At most ADDRESSES addresses and networks are kept. Those at their limit are kept until
  their window ends; below it, the least recently failed is forgotten first. Before,
  a client with many addresses could push out an address that had reached its limit
  by failing from 10,000 others, and it was let in again. A restart forgets them all
  (an account's lock is kept in its row).
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict

log = logging.getLogger(__name__)

ADDRESSES = 10_000  # addresses and networks kept, a few hundred bytes each
IPV6_NETWORK = 64  # the prefix a provider or a LAN hands to one host or segment
HOSTS_PER_NETWORK = 5  # a /64's limit, in times the address's


def counted_as(address: str) -> list[tuple[str, int]]:
    """What a failure from `address` counts against, each with its limit in times
    `limit`: the address, and for IPv6 its /64 too."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return [(address, 1)]
    if isinstance(ip, ipaddress.IPv4Address):
        return [(str(ip), 1)]
    if ip.ipv4_mapped is not None:
        return [(str(ip.ipv4_mapped), 1)]
    network = ipaddress.IPv6Interface((int(ip), IPV6_NETWORK)).network  # int(): no %scope
    return [(str(ip), 1), (str(network), HOSTS_PER_NETWORK)]


class AddressThrottle:
    def __init__(self, *, limit: int, window: float) -> None:
        """`limit` failures (0: no throttle) within `window` seconds of the first."""
        self.limit = limit
        self.window = window
        # Below their limit: failures, since; the least recently failed first.
        self._counting: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # At their limit: since; in the order they reached it.
        self._refused: OrderedDict[str, float] = OrderedDict()

    def retry_after(self, address: str, now: float) -> int:
        """Whole seconds until `address` may log in again; 0 if it may now. A window
        that began "after now" (the wall clock stepped back) is over."""
        if self.limit <= 0:
            return 0
        return max(self._wait(key, now) for key, _ in counted_as(address))

    def fail(self, address: str, now: float) -> None:
        """Count one wrong password checked for a login from `address`."""
        if self.limit <= 0:
            return
        for key, share in counted_as(address):
            self._count(key, self.limit * share, now)
        while self._refused and not self._wait(next(iter(self._refused)), now):
            self._refused.popitem(last=False)  # windows over: roughly in the order they end
        while len(self._counting) + len(self._refused) > ADDRESSES:
            (self._counting or self._refused).popitem(last=False)

    def _wait(self, key: str, now: float) -> int:
        since = self._refused.get(key)
        if since is None or not since <= now < since + self.window:
            return 0
        return max(1, math.ceil(since + self.window - now))

    def _count(self, key: str, limit: int, now: float) -> None:
        if self._wait(key, now):
            return  # a check that began before the key was refused: nothing more to count
        self._refused.pop(key, None)
        failures, since = self._counting.pop(key, (0, now))
        if not since <= now < since + self.window:
            failures, since = 0, now
        failures += 1
        if failures < limit:
            self._counting[key] = (failures, since)
            return
        self._refused[key] = since
        log.warning("login throttled address=%s failures=%d seconds=%d", key, failures,
                    self._wait(key, now))
