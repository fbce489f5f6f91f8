"""Talking to OCI distribution registries: :mod:`.auth` (token and basic auth as an httpx flow)
and :mod:`.client` (resolve references, fetch manifests and blobs)."""

from . import tuning
from .auth import RegistryAuth
from .client import RegistryClient

__all__ = ["RegistryAuth", "RegistryClient"]

tuning.apply()
