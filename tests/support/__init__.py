"""Test support: a real registry process and a fault-injecting proxy in front of it.

The package's tests talk to a genuine CNCF distribution (``docker-registry``)
rather than a mock, so protocol details (Range handling, upload Location URLs,
error bodies) are the real ones.  :class:`Proxy` sits between the code under
test and that registry to count traffic and to inject the failures a real
network produces (corruption, truncated bodies, throttling, slow answers).
"""

from .proxy import Fault, Hit, Proxy
from .registry import Registry, RegistryError, free_port

__all__ = ["Fault", "Hit", "Proxy", "Registry", "RegistryError", "free_port"]
