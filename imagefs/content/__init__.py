"""The content store: a cache of blobs shaped like containerd's local store.

:mod:`.store` holds the narrow capabilities (``Provider`` reads, ``Ingester`` hands out the one
``Writer`` of a ref, ``Manager`` labels and deletes, ``Tags`` remembers resolutions);
:mod:`.local` implements them on a directory laid out as :mod:`.layout` says; :mod:`.labels`
names the labels a committed blob carries.
"""

from .local import LocalStore, LocalWriter, default_cache_dir
from .store import Info, Ingester, Manager, Provider, Store, Tags, Writer

__all__ = ["Info", "Ingester", "LocalStore", "LocalWriter", "Manager", "Provider", "Store", "Tags", "Writer",
           "default_cache_dir"]
