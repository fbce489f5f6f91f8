"""Registry authentication as an httpx auth flow.

The flow sends the request as is (or with a token it already has for that scope); on a 401 with
``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` it yields a token request to the realm,
then yields the original request again with the token — the shape of httpx's own ``DigestAuth``.
Being a plain generator, it is tested by driving it with ``next``/``send``. Tokens are kept in
memory only: they never reach a log line, an xattr or the cache.
"""

from __future__ import annotations

import base64
import re
import time
from typing import AsyncGenerator, Callable, Generator

import httpx

_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')

Credentials = Callable[[str], "tuple[str, str] | None"]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ``("bearer", {"realm": …, "service": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM_RE.finditer(rest)}
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """Anonymous or credentialed bearer-token auth, and basic auth where a registry asks for it."""

    def __init__(self, credentials: Credentials | None = None) -> None:
        self._credentials = credentials or (lambda host: None)
        # (realm, service, scope) -> (token, expiry in monotonic seconds)
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._basic: dict[str, str] = {}
        self._last_scope: dict[str, tuple[str, str, str]] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        host = request.url.netloc.decode()
        self._authorize(request, host)
        response = yield request
        if response.status_code != 401 or "www-authenticate" not in response.headers:
            return
        scheme, params = parse_challenge(response.headers["www-authenticate"])
        if scheme == "basic":
            creds = self._credentials(host)
            if creds is None:
                return
            self._basic[host] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            request.headers["Authorization"] = self._basic[host]
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            return
        key = (params["realm"], params.get("service", ""), params.get("scope", ""))
        token_request = self._token_request(key, host)
        token_request.extensions = {**token_request.extensions, "imagefs_token": True}
        token_response = yield token_request
        token = self._take_token(key, token_response)
        if token is None:
            return  # the original 401 stands; the client reports it
        self._last_scope[host] = key
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        # Only token responses are read here: reading every response would buffer whole blobs.
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if request.extensions.get("imagefs_token"):
                await response.aread()
            try:
                request = flow.send(response)
            except StopIteration:
                break

    def _authorize(self, request: httpx.Request, host: str) -> None:
        key = self._last_scope.get(host)
        if key and key in self._tokens:
            token, expiry = self._tokens[key]
            if time.monotonic() < expiry:
                request.headers["Authorization"] = f"Bearer {token}"
                return
        if host in self._basic:
            request.headers["Authorization"] = self._basic[host]

    def _token_request(self, key: tuple[str, str, str], host: str) -> httpx.Request:
        realm, service, scope = key
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {}
        creds = self._credentials(host)
        if creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        return httpx.Request("GET", realm, params=params, headers=headers)

    def _take_token(self, key: tuple[str, str, str], response: httpx.Response) -> str | None:
        if response.status_code != 200:
            return None
        try:
            doc = response.json()
        except ValueError:
            return None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            return None
        expires_in = doc.get("expires_in")
        # Renew a little early; the distribution spec's default lifetime is 60 s.
        lifetime = expires_in if isinstance(expires_in, (int, float)) and expires_in > 0 else 60
        self._tokens[key] = (token, time.monotonic() + max(lifetime - 10, lifetime / 2))
        return token
