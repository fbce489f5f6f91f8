"""The content store: a cache of blobs shaped like containerd's local store.

:mod:`.store` holds the narrow capabilities (``Provider`` reads, ``Ingester`` writes,
``Manager`` labels); :mod:`.local` implements them on a directory.
"""

from .local import LocalStore, Writer, default_cache_dir
from .store import Info, Ingester, Manager, Provider

__all__ = ["Info", "Ingester", "LocalStore", "Manager", "Provider", "Writer", "default_cache_dir"]
