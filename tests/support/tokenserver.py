"""A small token issuer for distribution's ``auth: token``, on 127.0.0.1, for tests.

Why write one: the real ones (docker_auth, Harbor core, Docker Hub's auth.docker.io) need a
container runtime or the internet. What the registry checks is small and fixed by the
distribution token spec, and this server produces exactly that: RS256 JWTs whose header
carries the signing certificate (``x5c``), issued by a CA in the registry's
``rootcertbundle``, with ``iss``, ``aud`` (the service), ``exp``/``nbf`` and the ``access``
claims the ACL grants for the requested scopes.

It answers both ways clients ask (distribution ``docs/spec/auth``):

- ``GET /token?service=…&scope=…`` with optional basic auth (anonymous without it);
- ``POST /token`` with the OAuth2 form: ``grant_type=password`` (username, password) or
  ``grant_type=refresh_token`` (an identity token), plus ``client_id``, service and scope.

``allow_get = False`` makes it a realm that only speaks the OAuth2 form (answers ``GET`` with
405), as some registries' realms do. Every request is recorded in :attr:`TokenServer.requests`
and every token in :attr:`TokenServer.issued`, so tests can count fetches and grep logs for them.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from .tls import CA

__all__ = ["Rule", "TokenRequest", "TokenServer"]

SERVICE = "imagefs-test-registry"
ISSUER = "imagefs-test-issuer"


@dataclass(frozen=True)
class Rule:
    """``who`` (a user name, or ``None`` for anyone, anonymous included) may do ``actions`` on
    repositories matching the glob ``repos``."""

    who: str | None
    repos: str
    actions: frozenset[str]


@dataclass
class TokenRequest:
    """One request to the realm, as the server understood it."""

    method: str
    grant_type: str  # "" for GET
    account: str | None  # the authenticated user; None when anonymous or refused
    scopes: list[str]
    client_id: str
    status: int
    params: dict[str, str] = field(default_factory=dict, repr=False)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The issuer; ``registry_config()`` is the ``auth:`` section for a :class:`Registry`."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str],
        rules: Sequence[Rule],
        refresh_tokens: Mapping[str, str] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users)
        self.rules = list(rules)
        self.refresh_tokens = dict(refresh_tokens or {})  # identity token -> user
        self.expires_in = expires_in
        self.allow_get = True
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        self._lock = threading.Lock()
        ca = CA("imagefs token signing CA")
        self.bundle = ca.write_cert(self.workdir / "token-root.pem")
        self._signer = ca.issue("imagefs token signer", usage="signing", rsa_key=True)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> dict[str, Any]:
        return {"auth": {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                                   "rootcertbundle": str(self.bundle)}}}

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.issuer = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="tokenserver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "TokenServer":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.allow_get = True

    # -- issuing ----------------------------------------------------------------------------

    def grant(self, account: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """The ``access`` claim: for each requested repository scope, the actions the rules allow."""
        access = []
        for scope in scopes:
            for item in scope.split(" "):
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not name:
                    continue
                allowed: set[str] = set()
                for rule in self.rules:
                    if (rule.who is None or rule.who == account) and fnmatch.fnmatchcase(name, rule.repos):
                        allowed |= rule.actions
                granted = sorted(set(actions.split(",")) & allowed)
                if granted:
                    access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def token(self, account: str | None, scopes: list[str]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._signer.cert_der).decode()]}
        claims = {
            "iss": ISSUER, "sub": account or "", "aud": SERVICE,
            "exp": now + self.expires_in, "nbf": now - 5, "iat": now, "jti": secrets.token_hex(16),
            "access": self.grant(account, scopes),
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64url(signature)}"
        with self._lock:
            self.issued.append(token)
        return token

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def fetches(self, scope: str | None = None) -> list[TokenRequest]:
        """Successful token requests (for ``scope``, if given)."""
        with self._lock:
            return [r for r in self.requests if r.status == 200 and (scope is None or scope in r.scopes)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def issuer(self) -> TokenServer:
        return self.server.issuer  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def _reply(self, status: int, doc: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, req: TokenRequest, status: int, message: str) -> None:
        req.status = status
        req.account = None
        self.issuer.record(req)
        extra = {"WWW-Authenticate": 'Basic realm="imagefs-test-token"'} if status == 401 else None
        self._reply(status, {"errors": [{"code": "UNAUTHORIZED" if status == 401 else "DENIED", "message": message}]}, extra)

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        req = TokenRequest("GET", "", None, query.get("scope", []), query.get("client_id", [""])[0], 0,
                           {k: v[0] for k, v in query.items()})
        if url.path != "/token":
            return self._refuse(req, 404, "no such endpoint")
        if not self.issuer.allow_get:
            return self._refuse(req, 405, "this realm only takes the OAuth2 POST form")
        header = self.headers.get("Authorization", "")
        if header:
            try:
                user, _, password = base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")
            except (IndexError, ValueError):
                return self._refuse(req, 400, "bad Authorization header")
            if self.issuer.users.get(user) != password:
                return self._refuse(req, 401, "invalid username or password")
            req.account = user
        token = self.issuer.token(req.account, req.scopes)
        req.status = 200
        self.issuer.record(req)
        self._reply(200, {"token": token, "access_token": token, "expires_in": self.issuer.expires_in,
                          "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        first = {k: v[0] for k, v in form.items()}
        grant = first.get("grant_type", "")
        req = TokenRequest("POST", grant, None, form.get("scope", []), first.get("client_id", ""), 0,
                           {k: v for k, v in first.items() if k not in ("password", "refresh_token")})
        if urlsplit(self.path).path != "/token":
            return self._refuse(req, 404, "no such endpoint")
        if not req.client_id:
            return self._refuse(req, 400, "client_id is required")
        if grant == "password":
            user = first.get("username", "")
            if not user or self.issuer.users.get(user) != first.get("password"):
                return self._refuse(req, 401, "invalid username or password")
        elif grant == "refresh_token":
            user = self.issuer.refresh_tokens.get(first.get("refresh_token", ""), "")
            if not user:
                return self._refuse(req, 401, "invalid refresh token")
        else:
            return self._refuse(req, 400, f"unsupported grant_type {grant!r}")
        req.account = user
        token = self.issuer.token(user, req.scopes)
        req.status = 200
        self.issuer.record(req)
        self._reply(200, {"access_token": token, "expires_in": self.issuer.expires_in, "scope": " ".join(req.scopes),
                          "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
