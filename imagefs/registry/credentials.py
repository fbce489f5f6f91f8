"""Registry credentials where users already keep them, and the TLS context a registry is reached with.

A mount never asks for a password: it finds the one ``docker login``, ``podman login`` or
``skopeo login`` stored, or takes ``--username`` with ``--password-stdin``. The lookup is lazy:
:func:`credentials_for` returns a callable that reads nothing until a registry challenges, so a
public image never touches a credential helper. For a registry host it tries, first match wins:

1. the command line (``--username``/``--password-stdin``), for the image's own registry only —
   a password typed for one registry is never offered to a mirror or another host;
2. the containers ``auth.json`` (podman, skopeo, buildah): ``$REGISTRY_AUTH_FILE``, else
   ``$XDG_RUNTIME_DIR/containers/auth.json``; then ``$XDG_CONFIG_HOME/containers/auth.json``
   (``~/.config/containers/auth.json``). Keys may name a namespace or repository
   (``quay.io/org``); the most specific one matching the image wins, as containers/image does;
3. the Docker ``config.json`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``).

This is containers/image's own order (its auth file before Docker's), behind the command line as
every tool puts it. Within one file: ``credHelpers[host]``, then ``credsStore``, then the plain
``auths`` entry (base64 ``auth`` or ``username``/``password``, and ``identitytoken``) — Docker's
order; where a helper has nothing for the host the ``auths`` entry still counts, so a config
copied between machines keeps working. Keys are normalised as Docker does: the scheme and any
path are dropped, and ``https://index.docker.io/v1/``, ``index.docker.io`` and
``registry-1.docker.io`` all mean ``docker.io``.

Helpers are run as ``docker-credential-NAME get`` with the server on stdin and JSON on stdout
(the docker-credential-helpers protocol); a helper that is missing or fails is a warning, and
the mount goes on anonymously — the registry's refusal, if any, then says "(anonymous)".

Secrets stay in :class:`Credential`, whose ``repr`` hides them, and are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..errors import ConfigError
from ..reference import Reference

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
#: What Docker calls Docker Hub in its config and passes to credential helpers.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
#: A helper's Username meaning "Secret is an identity (refresh) token", per docker-credential-helpers.
TOKEN_USERNAME = "<token>"
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credential:
    """A user name with a password or an OAuth2 identity (refresh) token; ``repr`` shows neither."""

    username: str
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""

    @property
    def identity(self) -> str:
        """How errors name who we were: ``as USER`` (never a secret)."""
        return f"as {self.username or TOKEN_USERNAME}"


CredentialLookup = Callable[[str], "Credential | None"]


def registry_key(key: str, *, keep_path: bool = False) -> str:
    """A config key or request host as a registry name: ``https://index.docker.io/v1/`` → ``docker.io``.

    Docker keeps only the host of a key; containers' ``auth.json`` may name a namespace, so
    ``keep_path`` keeps the path (minus Docker's ``/v1/`` and ``/v2/`` suffixes).
    """
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    host, _, path = text.strip("/").partition("/")
    host = host.lower()
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    path = path.strip("/")
    if not keep_path or path in ("", "v1", "v2"):
        return host
    return f"{host}/{path}"


def credentials_for(
    ref: Reference | None = None,
    username: str | None = None,
    password: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CredentialLookup:
    """The credential lookup for a mount of ``ref`` (a :class:`~imagefs.reference.Reference`).

    Nothing is read now; the returned callable takes a registry host (as requests name it,
    ``registry-1.docker.io`` or ``127.0.0.1:5000``) and searches as the module docstring says.
    """
    cli = Credential(username, password, source="the command line") if username and password is not None else None
    return _Lookup(
        registry=registry_key(ref.registry) if ref is not None else None,
        repository=ref.repository if ref is not None else "",
        cli=cli,
        environ=environ,
    )


@dataclass(frozen=True)
class _Lookup:
    registry: str | None
    repository: str
    cli: Credential | None = field(repr=False)
    environ: Mapping[str, str] | None = None

    def __call__(self, host: str) -> Credential | None:
        env = os.environ if self.environ is None else self.environ
        name = registry_key(host)
        if self.cli is not None and name == self.registry:
            return self.cli
        for path, containers in _auth_files(env):
            doc = _read_config(path)
            if doc is None:
                continue
            cred = _from_config(doc, name, self.repository if containers else "", path, env)
            if cred is not None:
                log.debug("credentials for %s: %s from %s", name, cred.identity, cred.source)
                return cred
        log.debug("no credentials for %s: anonymous", name)
        return None


def _auth_files(env: Mapping[str, str]) -> list[tuple[Path, bool]]:
    """The files to search, in order, each with whether it is a containers ``auth.json``."""
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    files: list[tuple[Path, bool]] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append((Path(env["REGISTRY_AUTH_FILE"]), True))
    elif env.get("XDG_RUNTIME_DIR"):
        files.append((Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", True))
    else:
        files.append((Path(f"/run/containers/{os.getuid()}/auth.json"), True))
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    files.append((config_home / "containers" / "auth.json", True))
    docker = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append((docker / "config.json", False))
    return files


def _read_config(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s; ignoring it", path, exc.strerror or exc)
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        # As docker does: a broken config is a warning, not a failed pull of a public image.
        log.warning("%s is not valid JSON (%s); ignoring it", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _from_config(doc: dict, name: str, repository: str, path: Path, env: Mapping[str, str]) -> Credential | None:
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if isinstance(helper, str) and helper and registry_key(key) == name:
                cred = run_helper(helper, name, env)
                if cred is not None:
                    return cred
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        cred = run_helper(store, name, env)
        if cred is not None:
            return cred
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    entries = {registry_key(k, keep_path=bool(repository)): v for k, v in auths.items() if isinstance(v, dict)}
    for candidate in _scopes(name, repository):
        if candidate in entries:
            return _decode_entry(entries[candidate], f"{path} ({candidate})")
    return None


def _scopes(name: str, repository: str) -> list[str]:
    """``host/a/b/c``, ``host/a/b``, ``host/a``, ``host``: most specific first."""
    parts = repository.split("/") if repository else []
    return [f"{name}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [name]


def _decode_entry(entry: dict, source: str) -> Credential | None:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    identity_token = entry.get("identitytoken") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            log.warning("%s: the auth field is not base64 of user:password; ignoring it", source)
            return None
        user, sep, secret = decoded.partition(":")
        if not sep:
            log.warning("%s: the auth field is not base64 of user:password; ignoring it", source)
            return None
        username, password = user, secret
    if not isinstance(username, str) or not isinstance(password, str) or not isinstance(identity_token, str):
        return None
    if not (password or identity_token):
        return None
    return Credential(username, password, identity_token, source=source)


def run_helper(helper: str, registry: str, env: Mapping[str, str] | None = None) -> Credential | None:
    """``docker-credential-HELPER get`` for ``registry``; ``None`` when it has nothing (or fails)."""
    env = os.environ if env is None else env
    exe = f"docker-credential-{helper}"
    found = shutil.which(exe, path=env.get("PATH"))
    if found is None:
        log.warning("credential helper %s is not on PATH; going on without it", exe)
        return None
    server = DOCKER_HUB_SERVER if registry == DOCKER_HUB else registry
    try:
        done = subprocess.run([found, "get"], input=server, capture_output=True, text=True,
                              timeout=HELPER_TIMEOUT, env=dict(env))
    except subprocess.TimeoutExpired:
        log.warning("credential helper %s gave no answer in %.0f s; going on without it", exe, HELPER_TIMEOUT)
        return None
    except OSError as exc:
        log.warning("cannot run credential helper %s: %s", exe, exc.strerror or exc)
        return None
    if done.returncode != 0:
        # On failure helpers print their reason (never the secret) on stdout.
        reason = (done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0][:200]
        if "credentials not found" in reason.lower():
            log.debug("credential helper %s has nothing for %s", exe, server)
        else:
            log.warning("credential helper %s failed for %s: %s", exe, server, reason)
        return None
    try:
        doc = json.loads(done.stdout)
        username, secret = doc.get("Username") or "", doc.get("Secret") or ""
    except (ValueError, AttributeError):
        log.warning("credential helper %s answered something that is not its JSON; going on without it", exe)
        return None
    if not isinstance(secret, str) or not secret or not isinstance(username, str):
        return None
    if username == TOKEN_USERNAME:
        return Credential(TOKEN_USERNAME, identity_token=secret, source=exe)
    return Credential(username, secret, source=exe)


def ssl_context(ca_file: str | None = None, insecure: bool = False, cert_dir: str | None = None) -> ssl.SSLContext | bool:
    """The TLS set-up for a registry: the system's CAs, as docker and skopeo trust.

    ``ca_file`` replaces them with one bundle (``--ca-file``). ``cert_dir`` is laid out as
    docker's ``/etc/docker/certs.d/HOST/``: every ``*.crt`` is an extra CA, and ``client.cert``
    with ``client.key`` (or any ``NAME.cert`` with ``NAME.key``) is the client certificate a
    registry may demand. ``insecure`` skips verification (the caller warns loudly) yet still
    presents a client certificate. ``False`` means no verification at all, for httpx.
    """
    if insecure and not cert_dir:
        return False
    try:
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file {ca_file}: cannot load a CA bundle from it: {_ssl_reason(exc)}") from exc
    if cert_dir:
        _load_cert_dir(ctx, Path(cert_dir))
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_cert_dir(ctx: ssl.SSLContext, directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"--cert-dir {directory}: not a directory")
    for crt in sorted(directory.glob("*.crt")):
        try:
            ctx.load_verify_locations(cafile=str(crt))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{crt}: not a CA certificate: {_ssl_reason(exc)}") from exc
    certs = sorted(directory.glob("*.cert"), key=lambda p: (p.name != "client.cert", p.name))
    for key in sorted(directory.glob("*.key")):
        if not key.with_suffix(".cert").exists():
            raise ConfigError(f"{key}: no matching client certificate {key.with_suffix('.cert').name}")
    if not certs:
        return
    cert = certs[0]
    key = cert.with_suffix(".key")
    if not key.exists():
        raise ConfigError(f"{cert}: no matching key {key.name}")
    if len(certs) > 1:
        log.warning("%s holds %d client certificates; using %s", directory, len(certs), cert.name)

    def no_passphrase() -> bytes:
        # Never let OpenSSL prompt on a terminal a background mount does not have.
        raise ConfigError(f"{key}: the key is encrypted; imagefs needs an unencrypted key")

    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cert}: cannot load the client certificate: {_ssl_reason(exc)}") from exc


def _ssl_reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def tls_failure(exc: BaseException | None) -> str | None:
    """One clear line for a TLS failure somewhere in ``exc``'s causes, else ``None``.

    httpcore on trio reports a failed handshake as a ``ConnectError`` with no message; the
    :class:`ssl.SSLError` that says why is only in the chain, and the user needs it (and the
    option that fixes it) to tell an untrusted CA from a registry that wants a client certificate.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"TLS certificate verify failed: {exc.verify_message or exc.reason} "
                    "(--ca-file FILE trusts the registry's CA; --insecure skips the check)")
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or str(exc)
            if "CERTIFICATE_REQUIRED" in reason or "BAD_CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
                return f"TLS: the registry refused our client certificate or wants one ({reason}; see --cert-dir)"
            return f"TLS failure: {reason}"
        exc = exc.__cause__ or exc.__context__
    return None
