"""Where a registry's content may be fetched from: mirrors first, then the registry itself.

Many machines mounting the same images should not each pull from the upstream registry; a
mirror near them (distribution's pull-through cache, Harbor, a P2P proxy such as Dragonfly) serves
the same repository paths. This module reads the configuration the way containerd does, so one
``certs.d`` serves both:

``HOSTS_DIR/<registry>/hosts.toml`` (for ``host:port`` also ``host_port_/``; ``_default/`` for any
registry)::

    server = "https://registry.example"        # the upstream; default: the registry itself

    [host."https://mirror.internal"]
      capabilities = ["pull", "resolve"]       # default: pull, resolve, push
      ca = "mirror-ca.pem"                     # or a list; relative to hosts.toml
      skip_verify = false
      client = [["client.cert", "client.key"]] # or "client.pem", or a list of paths
      dial_timeout = "1s"
      override_path = false                    # true: the URL path is the API root (no /v2)
      [host."https://mirror.internal".header]
        x-custom = "value"                     # or a list of values

The ``[host]`` entries are tried in the order written, then ``server``; top-level ``ca``,
``skip_verify``, ``header``… apply to ``server``. ``--mirror URL`` adds a mirror (pull and resolve)
before them. Resolving a tag is a trusted operation: only hosts with ``resolve`` do it, while a
pull by digest is verified and any ``pull`` host will do. As containerd does, requests to a host
other than the registry carry ``?ns=<registry>`` so a mirror of several registries knows which
one is meant.

Docker's certificate layout (``*.crt``, ``*.cert``/``*.key`` in the directory, without a
hosts.toml) is not read here.
"""

from __future__ import annotations

import logging
import posixpath
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..errors import HostsConfigError

log = logging.getLogger(__name__)

#: Searched in order by :func:`default_hosts_dir`: our own, then containerd's.
HOSTS_DIRS = (Path("/etc/imagefs/certs.d"), Path("/etc/containerd/certs.d"))
CAPABILITIES = frozenset({"pull", "resolve", "push"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Endpoint:
    """One place to send registry requests: a mirror or the upstream.

    ``root`` is the API root (``https://mirror.example/v2``); a repository's URLs hang below it.
    """

    root: str
    capabilities: frozenset[str] = CAPABILITIES
    ns: str | None = None
    ca: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str], ...] = ()
    skip_verify: bool | None = None
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None
    source: str = field(default="", compare=False)

    @property
    def netloc(self) -> str:
        return urlsplit(self.root).netloc

    @property
    def origin(self) -> str:
        parts = urlsplit(self.root)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def own_tls(self) -> bool:
        """Whether this host needs TLS settings of its own rather than the mount's."""
        return bool(self.ca or self.client_certs) or self.skip_verify is not None

    def url(self, repository: str, *parts: str) -> str:
        return "/".join([self.root, repository, *parts])

    def params(self) -> dict[str, str]:
        return {"ns": self.ns} if self.ns else {}

    def tls(self) -> bool | ssl.SSLContext:
        """The ``verify=`` for this host: system CAs plus ``ca``, client certificates, or no checks."""
        if self.skip_verify and not self.client_certs:
            return False
        ctx = ssl.create_default_context()
        try:
            for ca in self.ca:
                ctx.load_verify_locations(cafile=ca)
            for cert, key in self.client_certs:
                ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise HostsConfigError(f"{self.source or self.origin}: cannot load TLS files for {self.origin}: {exc}") from exc
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def default_hosts_dir() -> Path | None:
    """``/etc/imagefs/certs.d`` if it exists, else containerd's ``/etc/containerd/certs.d``, else None."""
    for path in HOSTS_DIRS:
        if path.is_dir():
            return path
    return None


def uses_plain_http(host: str, plain_http: bool) -> bool:
    """HTTP only when asked, or for a registry on this machine (as Docker treats localhost)."""
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return plain_http or hostname in LOOPBACK_HOSTS


def host_dirs(root: Path, registry: str) -> list[Path]:
    """containerd's search order for a registry's directory: ``host_port_``, ``host:port``, ``_default``."""
    names = []
    colon = registry.rfind(":")
    if colon > 0:
        names.append(f"{registry[:colon]}_{registry[colon + 1:]}_")
    names += [registry, "_default"]
    return [root / name for name in names]


def find_hosts_file(root: Path, registry: str) -> Path | None:
    """The hosts.toml for ``registry``: the first directory that exists decides, as in containerd."""
    for directory in host_dirs(root, registry):
        if directory.is_dir():
            path = directory / "hosts.toml"
            return path if path.is_file() else None
    return None


def endpoints(
    registry: str,
    upstream: str,
    *,
    mirrors: Sequence[str] = (),
    hosts_dir: Path | str | None = None,
    plain_http: bool = False,
) -> list[Endpoint]:
    """The hosts to try for ``registry``, in order; the last is the upstream.

    ``upstream`` is the registry's own origin (``https://registry-1.docker.io``), used when no
    hosts.toml names a ``server``.
    """
    own = {registry, urlsplit(upstream).netloc}
    found: list[Endpoint] = [mirror_endpoint(m, registry, plain_http=plain_http, own=own) for m in mirrors]
    path = find_hosts_file(Path(hosts_dir), registry) if hosts_dir else None
    if path is not None:
        found += parse_hosts_file(path, registry, upstream, own=own)
    else:
        found.append(Endpoint(upstream.rstrip("/") + "/v2"))
    return found


def mirror_endpoint(text: str, registry: str, *, plain_http: bool = False, own: set[str] | None = None) -> Endpoint:
    """A ``--mirror`` URL: pull and resolve; https unless loopback or ``--plain-http``."""
    text = text.strip()
    if not text:
        raise HostsConfigError("--mirror: empty URL")
    if "://" not in text:
        host = text.split("/", 1)[0]
        text = ("http://" if uses_plain_http(host, plain_http) else "https://") + text
    return _endpoint(text, {"capabilities": ["pull", "resolve"]}, None, registry, own or {registry}, "--mirror")


def parse_hosts_file(path: Path, registry: str, upstream: str, *, own: set[str] | None = None) -> list[Endpoint]:
    """The endpoints a hosts.toml describes: its ``[host]`` entries in order, then ``server``."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HostsConfigError(f"{path}: {exc}") from exc
    own = own or {registry}
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{path}: 'host' must be a table of [host.\"URL\"] entries")
    found = []
    for url, config in hosts.items():
        if not isinstance(config, dict):
            raise HostsConfigError(f"{path}: host {url!r} must be a table")
        found.append(_endpoint(url, config, path.parent, registry, own, str(path)))
    server = doc.get("server") or upstream
    if not isinstance(server, str):
        raise HostsConfigError(f"{path}: 'server' must be a string")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    found.append(_endpoint(server, top, path.parent, registry, own, str(path)))
    log.debug("%s: hosts %s", path, ", ".join(e.root for e in found))
    return found


def _endpoint(url: str, config: dict[str, Any], base: Path | None, registry: str, own: set[str], source: str) -> Endpoint:
    where = f"{source}: {url}"
    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise HostsConfigError(f"{where}: only http:// and https:// hosts are supported")
        url = "https://" + url
    parts = urlsplit(url)
    if not parts.netloc:
        raise HostsConfigError(f"{where}: no host in URL")
    override = bool(config.get("override_path", False))
    path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override and not path.endswith("/v2"):
        path += "/v2"
    root = f"{parts.scheme}://{parts.netloc}{path}".rstrip("/")
    return Endpoint(
        root=root,
        capabilities=_capabilities(config.get("capabilities"), where),
        ns=None if parts.netloc in own else registry,
        ca=tuple(_abs(p, base) for p in _strings(config.get("ca"), f"{where}: ca")),
        client_certs=_client_certs(config.get("client"), base, where),
        skip_verify=_optional_bool(config.get("skip_verify"), f"{where}: skip_verify"),
        headers=_headers(config.get("header"), where),
        dial_timeout=_duration(config.get("dial_timeout"), f"{where}: dial_timeout"),
        source=source,
    )


def _capabilities(value: Any, where: str) -> frozenset[str]:
    if value is None or value == []:
        return CAPABILITIES
    names = frozenset(s.lower() for s in _strings(value, f"{where}: capabilities"))
    unknown = names - CAPABILITIES
    if unknown:
        raise HostsConfigError(f"{where}: unknown capability {', '.join(sorted(unknown))} (known: pull, resolve, push)")
    return names


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: expected a string or a list of strings")


def _abs(path: str, base: Path | None) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or base is None else base / p)


def _client_certs(value: Any, base: Path | None, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: client: expected a path, a list of paths or of [cert, key] pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            pairs.append((_abs(item[0], base), _abs(item[1], base) if item[1] else ""))
        else:
            raise HostsConfigError(f"{where}: client: invalid entry {item!r}")
    return tuple(pairs)


def _optional_bool(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise HostsConfigError(f"{where}: expected true or false")


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: header must be a table")
    return tuple((name, v) for name, values in value.items() for v in _strings(values, f"{where}: header {name}"))


def _duration(value: Any, where: str) -> float | None:
    """A Go duration (``"1s"``, ``"500ms"``, ``"1m30s"``) in seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = value.strip() if isinstance(value, str) else ""
    if not re.fullmatch(rf"(?:{_DURATION.pattern})+", text):
        raise HostsConfigError(f"{where}: expected a duration such as \"1s\" or \"500ms\"")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
