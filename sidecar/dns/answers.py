"""The addresses the pod's DNS answered for each allowed name: what binds ``tls: passthrough`` to its name.

The DNS proxy remembers the ``A``/``AAAA`` records of every answer it relays (under the name the agent
asked for, CNAME chains included), each until its TTL ends but at least ``dns.binding_min_ttl`` and at
most a day; the connection decision then accepts a passthrough connection only to one of them (or
to the name's ``envoy.destinations`` pin). Bounded: at most :data:`MAX_NAMES` names and
:data:`MAX_ADDRESSES` addresses a name (the oldest go first).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

__all__ = ["MAX_ADDRESSES", "MAX_NAMES", "Address", "AddressBook"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_NAMES = 10_000
MAX_ADDRESSES = 64
_DAY = 86400.0


class AddressBook:
    """Name -> addresses with an expiry (POSIX seconds); one event loop writes, decisions read.

    Args:
        min_ttl: how long, at least, an address is kept (seconds).
    """

    def __init__(self, min_ttl: float = 60.0) -> None:
        self.min_ttl = min_ttl
        self._names: OrderedDict[str, dict[Address, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def remember(self, name: str, answers: list[tuple[Address, int]], now: float) -> None:
        """Keep ``answers`` (address, TTL seconds) for the canonical ``name``."""
        if not answers:
            return
        known = self._names.pop(name, {})
        for address, ttl in answers:
            known[address] = max(known.get(address, 0.0), now + min(max(float(ttl), self.min_ttl), _DAY))
        if len(known) > MAX_ADDRESSES:
            known = dict(sorted(known.items(), key=lambda item: item[1])[-MAX_ADDRESSES:])
        self._names[name] = known
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)

    def addresses(self, name: str, now: float) -> frozenset[Address]:
        """The unexpired addresses answered for ``name``."""
        known = self._names.get(name)
        if not known:
            return frozenset()
        return frozenset(address for address, until in known.items() if until > now)
