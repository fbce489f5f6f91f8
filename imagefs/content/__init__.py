"""The content store: a cache of blobs shaped like containerd's local store.

:mod:`.store` holds the narrow capabilities (``Provider`` reads, ``Ingester`` hands out the one
``Writer`` of a ref, ``Manager`` labels and deletes, ``Tags`` remembers resolutions);
:mod:`.local` implements them on a directory laid out as :mod:`.layout` says; :mod:`.labels`
names the labels a committed blob carries.

Imported lazily: the command that starts a background mount reads :mod:`.layout` and
:func:`.layout.default_cache_dir` only, and need not load trio.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layout import default_cache_dir
    from .local import LocalStore, LocalWriter
    from .store import Info, Ingester, Manager, Provider, Store, Tags, Writer

__all__ = ["Info", "Ingester", "LocalStore", "LocalWriter", "Manager", "Provider", "Store", "Tags", "Writer",
           "default_cache_dir"]

def __getattr__(name: str):
    if name == "default_cache_dir":
        from .layout import default_cache_dir

        return default_cache_dir
    if name in ("LocalStore", "LocalWriter"):
        from . import local

        return getattr(local, name)
    if name in __all__:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
