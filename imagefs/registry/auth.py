"""Registry authentication as an httpx auth flow.

The flow sends the request as is (or with what it already holds for that repository); on a 401
it answers the challenge the way ``docker pull`` and containerd do:

- ``WWW-Authenticate: Bearer realm=…,service=…,scope=…``: get a token from the realm and send
  the request again with it. Anonymous when no credentials are found; with credentials a
  ``GET`` with basic auth (the distribution token spec), or the OAuth2 form —
  ``POST grant_type=password`` (``client_id=imagefs``, username, password, service, scope) when
  the realm refuses the ``GET`` with 404/405, and ``grant_type=refresh_token`` when the user has
  an identity token (``docker login`` stores one for registries that issue them).
- ``WWW-Authenticate: Basic``: send the credentials, and keep sending them to that host.

Tokens are kept per (realm, service, scope), in memory only, and renewed before they expire
(``expires_in``, 60 s when absent, as the spec says) without waiting for a 401. Credentials are
looked up lazily, the first time a host challenges, and only once per host.

One token fetch serves every concurrent request for a scope: a mount starts dozens of blob
reads at once and a registry rate-limits its token endpoint. The fetching flow leaves a
:class:`trio.Event` in ``_inflight``; the others wait on it and reuse the token — no lock is
ever held across a ``yield``. The logic is one plain generator (:meth:`RegistryAuth._flow`)
that yields requests and, for the async driver only, :class:`_Wait`/:class:`_Lookup` effects;
so :meth:`RegistryAuth.auth_flow` can be driven by hand with ``next``/``send`` in tests.

No secret reaches a log line: debug lines name the realm, the scope and ``as USER``, never a
token, a password or an ``Authorization`` header; errors say "(anonymous)" or "(as USER)"
through :attr:`RegistryAuth.identity`.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Generator, Union

import httpx
import trio

from .credentials import TOKEN_USERNAME, Credential

log = logging.getLogger(__name__)

_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_REPO_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)(?:/|$)")

#: A credential lookup: registry host → credentials (a ``(user, password)`` pair is accepted too).
Credentials = Callable[[str], Union[Credential, "tuple[str, str]", None]]
#: (realm, service, scope): what one token is good for.
Scope = tuple[str, str, str]

CLIENT_ID = "imagefs"
DEFAULT_LIFETIME = 60.0
#: Marks a request to a token realm, whose (small) response the flow reads.
TOKEN_REQUEST = "imagefs_token"
_MISSING: Any = object()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ``("bearer", {"realm": …, "service": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM_RE.finditer(rest)}
    return scheme.lower(), params


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    expires: float


@dataclass(frozen=True)
class _Wait:
    """Effect: wait until a concurrent flow has fetched what this one needs."""

    event: trio.Event


@dataclass(frozen=True)
class _Lookup:
    """Effect: look credentials up (may run a helper: a thread in the async driver)."""

    host: str


class _Inflight:
    """A fetch in progress; ``outcome`` is True/False once it finished, None if it was abandoned."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: bool | None = None


Effect = Union[httpx.Request, _Wait, _Lookup]
Flow = Generator[Effect, Any, Any]


class RegistryAuth(httpx.Auth):
    """Anonymous or credentialed bearer-token auth, and basic auth where a registry asks for it.

    ``credentials`` is called with a registry host the first time that host challenges
    (see :func:`imagefs.registry.credentials.credentials_for`); ``clock`` is for tests.
    """

    def __init__(self, credentials: Credentials | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._credentials = credentials or (lambda host: None)
        self._clock = clock
        self._tokens: dict[Scope, _Token] = {}
        self._scopes: dict[tuple[str, str], Scope] = {}  # (host, repository) -> the scope it was challenged for
        self._basic: dict[str, str] = {}
        self._creds: dict[str, Credential | None] = {}
        self._inflight: dict[object, _Inflight] = {}
        self._identity = "anonymous"

    @property
    def identity(self) -> str:
        """Who the registry saw: ``"anonymous"`` or ``"as USER"`` — what access errors say."""
        return self._identity

    # -- drivers --------------------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The flow for one request, with no sharing between concurrent requests (tests, sync)."""
        flow = self._flow(request, shared=False)
        try:
            effect = next(flow)
            while True:
                if isinstance(effect, _Lookup):
                    effect = flow.send(self._lookup(effect.host))
                    continue
                assert isinstance(effect, httpx.Request), effect  # _Wait needs shared=True
                response = yield effect
                effect = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if request.extensions.get(TOKEN_REQUEST):
                response.read()
            try:
                request = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request, shared=True)
        try:
            effect = next(flow)
            while True:
                if isinstance(effect, _Wait):
                    await effect.event.wait()
                    effect = flow.send(None)
                elif isinstance(effect, _Lookup):
                    # A credential helper is a subprocess: keep it off the thread that serves FUSE.
                    effect = flow.send(await trio.to_thread.run_sync(self._lookup, effect.host))
                else:
                    response = yield effect
                    # Only token responses are read here: reading every response would buffer whole blobs.
                    if effect.extensions.get(TOKEN_REQUEST):
                        await response.aread()
                    effect = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    # -- the flow -------------------------------------------------------------------------------

    def _flow(self, request: httpx.Request, shared: bool) -> Flow:
        host = request.url.netloc.decode()
        slot = (host, _repository(request.url))
        if "authorization" not in request.headers:
            key = self._scopes.get(slot)
            if key is not None and self._fresh(key) is None:
                # Renew before it lapses rather than after a 401: one round trip fewer.
                yield from self._token(key, request, None, shared)
            self._authorize(request, host, slot)
        sent = request.headers.get("authorization", "")
        response = yield request
        if response.status_code != 401 or not _same_origin(request, response):
            return
        header = response.headers.get("www-authenticate")
        if not header:
            return
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            if sent.lower().startswith("basic "):
                return  # our credentials were refused: the 401 stands
            cred = yield from self._credential(host, shared)
            if cred is None or not cred.password:
                return
            log.debug("basic auth to %s %s", host, cred.identity)
            self._basic[host] = _basic(cred.username, cred.password)
            request.headers["Authorization"] = self._basic[host]
            yield request
            return
        if scheme != "bearer" or not params.get("realm"):
            return
        key: Scope = (params["realm"], params.get("service", ""), params.get("scope", ""))
        stale = sent[len("bearer "):] if sent.lower().startswith("bearer ") else None
        held = self._tokens.get(key)
        if stale is not None and params.get("error") == "insufficient_scope" and held and held.value == stale:
            return  # a new token for the same scope would grant no more
        token = yield from self._token(key, request, stale, shared)
        if token is None:
            return  # the original 401 stands; the client reports it
        self._scopes[slot] = key
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _authorize(self, request: httpx.Request, host: str, slot: tuple[str, str]) -> None:
        key = self._scopes.get(slot)
        token = self._fresh(key) if key is not None else None
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif host in self._basic:
            request.headers["Authorization"] = self._basic[host]

    def _fresh(self, key: Scope) -> str | None:
        held = self._tokens.get(key)
        return held.value if held is not None and self._clock() < held.expires else None

    def _token(self, key: Scope, request: httpx.Request, stale: str | None, shared: bool) -> Flow:
        """A valid token for ``key`` other than ``stale`` (the one the registry just refused)."""

        def ready() -> Any:
            held = self._tokens.get(key)
            if held is not None and held.value == stale:
                del self._tokens[key]
                return _MISSING
            return self._fresh(key) or _MISSING

        return (yield from self._once(("token", key), shared, ready, lambda: self._fetch_token(key, request, shared)))

    def _credential(self, host: str, shared: bool) -> Flow:
        def fetch() -> Flow:
            cred = yield _Lookup(host)
            self._creds[host] = cred
            if cred is not None:
                self._identity = cred.identity
            return cred

        return (yield from self._once(("credentials", host), shared, lambda: self._creds.get(host, _MISSING), fetch))

    def _once(self, key: object, shared: bool, ready: Callable[[], Any], produce: Callable[[], Flow]) -> Flow:
        """``produce()`` unless a concurrent flow is producing the same thing: then wait and reuse it."""
        while True:
            value = ready()
            if value is not _MISSING:
                return value
            running = self._inflight.get(key) if shared else None
            if running is not None:
                yield _Wait(running.event)
                if running.outcome is False:
                    return None  # it was refused; so would this flow be
                continue  # done (or abandoned by a cancelled flow): look again
            record = _Inflight()
            if shared:
                self._inflight[key] = record
            try:
                value = yield from produce()
                record.outcome = value is not None
                return value
            finally:
                if shared:
                    del self._inflight[key]
                    record.event.set()

    def _fetch_token(self, key: Scope, request: httpx.Request, shared: bool) -> Flow:
        host = request.url.netloc.decode()
        cred = yield from self._credential(host, shared)
        realm, service, scope = key
        if cred is not None and cred.identity_token:
            response = yield self._oauth(key, request, cred, "refresh_token")
        else:
            params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
            if cred is not None and cred.username and cred.username != TOKEN_USERNAME:
                params["account"] = cred.username
            headers = {"Authorization": _basic(cred.username, cred.password)} if cred is not None else {}
            response = yield _token_request(request, "GET", realm, params=params, headers=headers)
            if cred is not None and response.status_code in (404, 405):
                # This realm only speaks the OAuth2 form (as some do for GET with credentials).
                response = yield self._oauth(key, request, cred, "password")
        token = self._take_token(key, response)
        who = cred.identity if cred is not None else "anonymous"
        if token is None:
            log.debug("token realm %s refused %s %s: HTTP %d", realm, scope or "(no scope)", who, response.status_code)
        else:
            log.debug("token for %s from %s %s", scope or "(no scope)", realm, who)
        return token

    def _oauth(self, key: Scope, request: httpx.Request, cred: Credential, grant: str) -> httpx.Request:
        realm, service, scope = key
        form = {"grant_type": grant, "client_id": CLIENT_ID, "service": service}
        if scope:
            form["scope"] = scope
        if grant == "refresh_token":
            form["refresh_token"] = cred.identity_token
        else:
            form.update(username=cred.username, password=cred.password)
        return _token_request(request, "POST", realm, data=form)

    def _take_token(self, key: Scope, response: httpx.Response) -> str | None:
        if response.status_code != 200:
            return None
        try:
            doc = response.json()
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            return None
        expires_in = doc.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else DEFAULT_LIFETIME
        # Renew a little early, so a token never lapses between being attached and being checked.
        self._tokens[key] = _Token(token, self._clock() + max(lifetime - 10, lifetime / 2))
        return token

    def _lookup(self, host: str) -> Credential | None:
        found = self._credentials(host)
        if isinstance(found, tuple):
            user, password = found
            return Credential(user, password)
        return found


def _token_request(template: httpx.Request, method: str, url: str, **kw: Any) -> httpx.Request:
    request = httpx.Request(method, url, **kw)
    # Requests made here skip the client's build_request: carry its timeouts over by hand,
    # or a silent token server would hang the mount.
    extensions: dict[str, Any] = {TOKEN_REQUEST: True}
    if "timeout" in template.extensions:
        extensions["timeout"] = template.extensions["timeout"]
    request.extensions = {**request.extensions, **extensions}
    return request


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _repository(url: httpx.URL) -> str:
    match = _REPO_RE.match(url.path)
    return match.group(1) if match else ""


def _same_origin(request: httpx.Request, response: httpx.Response) -> bool:
    """A 401 from elsewhere (a redirect's target, such as a CDN) is not ours to answer."""
    try:
        final = response.request
    except RuntimeError:
        return True
    return final.url.netloc == request.url.netloc and final.url.scheme == request.url.scheme
