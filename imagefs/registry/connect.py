"""The registry client and pusher a verb uses, from the registry flags every verb shares.

Here rather than in :mod:`imagefs.fs.mount` so that verbs that only read or write a registry
(``pull``, ``inspect``, ``copy``) need not load the FUSE layer. :class:`RegistryOptions` is the
one record of those flags: the command line fills it, a mount keeps it in its options, and
:func:`make_client` / :func:`make_pusher` turn it into a client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..reference import Reference
from .credentials import credentials_for

if TYPE_CHECKING:
    from .client import RegistryClient
    from .push import Pusher


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry: TLS, credentials, patience and mirrors (``--plain-http`` …)."""

    plain_http: bool = False
    insecure: bool = False
    ca_file: str | None = None
    cert_dir: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # from --password-stdin; never printed
    timeout: float = 30.0
    mirrors: tuple[str, ...] = ()
    hosts_dir: Path | None = None


def make_client(ref: Reference, opts: RegistryOptions) -> "RegistryClient":
    """The registry client a mount (or any verb that reads a registry) uses."""
    return registry_client(ref, **asdict(opts))


def make_pusher(ref: Reference, opts: RegistryOptions) -> "Pusher":
    """The pusher a verb that writes to a registry uses."""
    return pusher(ref, **asdict(opts))


def registry_client(ref: Reference, *, plain_http: bool = False, insecure: bool = False, ca_file: str | None = None,
                    cert_dir: str | None = None, username: str | None = None, password: str | None = None,
                    timeout: float = 30.0, mirrors: Sequence[str] = (), hosts_dir: Path | None = None) -> "RegistryClient":
    """A client that reads ``ref``'s repository: mirrors first, as hosts.toml and --mirror say."""
    from .client import RegistryClient

    return RegistryClient(ref, plain_http=plain_http, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir,
                          credentials=credentials_for(ref, username, password), timeout=timeout,
                          mirrors=mirrors, hosts_dir=hosts_dir)


def pusher(ref: Reference, *, plain_http: bool = False, insecure: bool = False, ca_file: str | None = None,
           cert_dir: str | None = None, username: str | None = None, password: str | None = None,
           timeout: float = 30.0, mirrors: Sequence[str] = (), hosts_dir: Path | None = None) -> "Pusher":
    """A pusher to ``ref``'s repository. Mirrors serve pulls only, so ``mirrors`` and
    ``hosts_dir`` are taken (the shared flags) and not used: a push goes to the registry itself."""
    from .push import Pusher

    return Pusher(ref, plain_http=plain_http, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir,
                  credentials=credentials_for(ref, username, password), timeout=timeout)
