"""Talking to OCI distribution registries: :mod:`.auth` (token and basic auth as an httpx flow),
:mod:`.transport` (hosts, requests, retries, errors, counters), :mod:`.client` (the protocol:
resolve references, fetch manifests and blobs) and :mod:`.connect` (a client from the registry
flags every verb shares).

Imported lazily: ``imagefs --help`` and the command that starts a background mount read
:mod:`.hosts` only, and need not load httpx.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import RegistryAuth
    from .client import RegistryClient

__all__ = ["RegistryAuth", "RegistryClient"]


def __getattr__(name: str):
    if name == "RegistryAuth":
        from .auth import RegistryAuth

        return RegistryAuth
    if name == "RegistryClient":
        from .client import RegistryClient

        return RegistryClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
