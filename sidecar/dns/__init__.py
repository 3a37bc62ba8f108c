"""DNS control: the agent's DNS, redirected to the sidecar, answered only for the names its task allows.

* :mod:`sidecar.dns.proxy` - the UDP and TCP proxy (dnspython for the wire format): judges each query
  (:func:`sidecar.policy.names.decide_name`), forwards allowed ones to the pod's resolvers, refuses
  the rest with a record, drops what is not DNS;
* :mod:`sidecar.dns.resolv` - the resolvers of the pod's resolv.conf;
* :mod:`sidecar.dns.answers` - the addresses answered per name, which bind ``tls: passthrough``
  connections to their name.
"""

from sidecar.dns.answers import AddressBook
from sidecar.dns.resolv import read_nameservers

__all__ = ["AddressBook", "read_nameservers"]
