"""The registry auth flow, driven by hand (next/send) and through httpx with a MockTransport;
where credentials come from; the TLS context."""

import base64
import json
import ssl
import threading
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from imagefs.errors import ImagefsError
from imagefs.reference import parse
from imagefs.registry.auth import RegistryAuth, parse_challenge
from imagefs.registry.credentials import Credential, credentials_for, registry_key, ssl_context
from tests.support.tls import CA

CHALLENGE = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'


def test_parse_challenge():
    scheme, params = parse_challenge(CHALLENGE)
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull"}
    assert parse_challenge('Basic realm="r"') == ("basic", {"realm": "r"})


def test_bearer_flow_by_hand():
    auth = RegistryAuth()
    request = httpx.Request("GET", "https://registry.example/v2/a/b/manifests/latest")
    flow = auth.auth_flow(request)
    first = next(flow)
    assert "Authorization" not in first.headers
    token_request = flow.send(httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE}, request=first))
    assert token_request.url.host == "auth.example"
    assert token_request.url.params["service"] == "registry.example"
    assert token_request.url.params["scope"] == "repository:a/b:pull"
    assert "Authorization" not in token_request.headers  # anonymous
    retried = flow.send(httpx.Response(200, json={"token": "T0KEN", "expires_in": 300}, request=token_request))
    assert retried.headers["Authorization"] == "Bearer T0KEN"
    # a later request to the same host carries the token at once
    second = next(auth.auth_flow(httpx.Request("GET", "https://registry.example/v2/a/b/blobs/sha256:x")))
    assert second.headers["Authorization"] == "Bearer T0KEN"


def test_refused_token_leaves_the_401():
    auth = RegistryAuth()
    flow = auth.auth_flow(httpx.Request("GET", "https://r.example/v2/"))
    first = next(flow)
    token_request = flow.send(httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE}, request=first))
    try:
        flow.send(httpx.Response(403, request=token_request))
        raise AssertionError("flow should have ended")
    except StopIteration:
        pass


def test_credentials_go_to_the_token_realm_only():
    auth = RegistryAuth(lambda host: ("user", "s3cret"))
    flow = auth.auth_flow(httpx.Request("GET", "https://registry.example/v2/a/b/manifests/x"))
    first = next(flow)
    assert "Authorization" not in first.headers
    token_request = flow.send(httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE}, request=first))
    assert token_request.headers["Authorization"].startswith("Basic ")


async def test_async_client_end_to_end():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("authorization")))
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "abc"})
        if request.headers.get("authorization") != "Bearer abc":
            return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})
        return httpx.Response(200, content=b"x" * 10_000)

    async with httpx.AsyncClient(auth=RegistryAuth(), transport=httpx.MockTransport(handler)) as client:
        async with client.stream("GET", "https://registry.example/v2/a/b/blobs/sha256:x") as resp:
            body = await resp.aread()
    assert resp.status_code == 200 and len(body) == 10_000
    assert seen == [("registry.example", None), ("auth.example", None), ("registry.example", "Bearer abc")]


# -- driving the flow by hand: reuse, renewal, the OAuth2 form, basic ----------------------------

MANIFEST = "https://registry.example/v2/a/b/manifests/latest"
BLOB = "https://registry.example/v2/a/b/blobs/sha256:x"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def challenge(request: httpx.Request, header: str = CHALLENGE) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": header}, request=request)


def token_response(request: httpx.Request, token: str, expires_in: int | None = 300) -> httpx.Response:
    doc = {"token": token} if expires_in is None else {"token": token, "expires_in": expires_in}
    return httpx.Response(200, json=doc, request=request)


def first_token(auth: RegistryAuth, token: str = "T1", url: str = MANIFEST, expires_in: int | None = 300) -> httpx.Request:
    """Run one request through a challenge and a token; return the retried request."""
    flow = auth.auth_flow(httpx.Request("GET", url))
    sent = next(flow)
    token_request = flow.send(challenge(sent))
    return flow.send(token_response(token_request, token, expires_in))


def ends(flow, response: httpx.Response) -> bool:
    try:
        flow.send(response)
    except StopIteration:
        return True
    return False


def test_token_is_reused_across_requests_until_it_expires():
    clock = Clock()
    auth = RegistryAuth(clock=clock)
    assert first_token(auth, "T1", expires_in=300).headers["Authorization"] == "Bearer T1"
    for url in (BLOB, MANIFEST, BLOB):
        flow = auth.auth_flow(httpx.Request("GET", url))
        sent = next(flow)  # straight out with the token: no 401, no token request
        assert sent.headers["Authorization"] == "Bearer T1"
        assert ends(flow, httpx.Response(200, request=sent))
    clock.now += 291  # renewed 10 s before expires_in runs out
    flow = auth.auth_flow(httpx.Request("GET", BLOB))
    renewal = next(flow)
    assert renewal.url.host == "auth.example" and renewal.url.params["scope"] == "repository:a/b:pull"
    sent = flow.send(token_response(renewal, "T2"))
    assert sent.url.path == "/v2/a/b/blobs/sha256:x" and sent.headers["Authorization"] == "Bearer T2"
    assert ends(flow, httpx.Response(200, request=sent))


def test_token_without_expires_in_lives_the_spec_default_60s():
    clock = Clock()
    auth = RegistryAuth(clock=clock)
    first_token(auth, "T1", expires_in=None)
    clock.now += 49
    assert next(auth.auth_flow(httpx.Request("GET", BLOB))).headers["Authorization"] == "Bearer T1"
    clock.now += 2
    assert next(auth.auth_flow(httpx.Request("GET", BLOB))).url.host == "auth.example"


def test_token_the_registry_rejects_is_replaced_once():
    auth = RegistryAuth()
    first_token(auth, "T1")
    flow = auth.auth_flow(httpx.Request("GET", BLOB))
    sent = next(flow)
    assert sent.headers["Authorization"] == "Bearer T1"
    token_request = flow.send(challenge(sent, CHALLENGE + ',error="invalid_token"'))
    assert token_request.url.host == "auth.example"
    retried = flow.send(token_response(token_request, "T2"))
    assert retried.headers["Authorization"] == "Bearer T2"
    assert ends(flow, challenge(retried))  # refused again: the 401 stands, no loop


def test_insufficient_scope_with_the_token_we_hold_asks_no_new_token():
    auth = RegistryAuth()
    first_token(auth, "T1")
    flow = auth.auth_flow(httpx.Request("GET", BLOB))
    sent = next(flow)
    assert ends(flow, challenge(sent, CHALLENGE + ',error="insufficient_scope"'))


def test_realm_refusing_get_gets_the_oauth2_password_form():
    auth = RegistryAuth(lambda host: ("alice", "pw"))
    flow = auth.auth_flow(httpx.Request("GET", MANIFEST))
    sent = next(flow)
    get = flow.send(challenge(sent))
    assert get.method == "GET" and get.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    post = flow.send(httpx.Response(405, request=get))
    assert post.method == "POST" and "Authorization" not in post.headers
    form = {k: v[0] for k, v in parse_qs(post.read().decode()).items()}
    assert form == {"grant_type": "password", "client_id": "imagefs", "username": "alice", "password": "pw",
                    "service": "registry.example", "scope": "repository:a/b:pull"}
    retried = flow.send(httpx.Response(200, json={"access_token": "OAUTH", "expires_in": 60}, request=post))
    assert retried.headers["Authorization"] == "Bearer OAUTH"
    assert auth.identity == "as alice"


def test_anonymous_has_no_form_to_fall_back_to():
    auth = RegistryAuth()
    flow = auth.auth_flow(httpx.Request("GET", MANIFEST))
    get = flow.send(challenge(next(flow)))
    assert ends(flow, httpx.Response(404, request=get))
    assert auth.identity == "anonymous"


def test_identity_token_uses_the_refresh_token_grant():
    auth = RegistryAuth(lambda host: Credential("alice", identity_token="REFRESH"))
    flow = auth.auth_flow(httpx.Request("GET", MANIFEST))
    post = flow.send(challenge(next(flow)))
    assert post.method == "POST"
    form = {k: v[0] for k, v in parse_qs(post.read().decode()).items()}
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "REFRESH" and form["client_id"] == "imagefs"
    assert "password" not in form


def test_basic_challenge_sends_credentials_and_keeps_sending_them():
    looked_up = []
    auth = RegistryAuth(lambda host: looked_up.append(host) or ("alice", "pw"))
    expected = "Basic " + base64.b64encode(b"alice:pw").decode()
    flow = auth.auth_flow(httpx.Request("GET", MANIFEST))
    sent = next(flow)
    assert "Authorization" not in sent.headers and looked_up == []  # lazily: nothing until challenged
    retried = flow.send(challenge(sent, 'Basic realm="registry"'))
    assert retried.headers["Authorization"] == expected and looked_up == ["registry.example"]
    assert ends(flow, httpx.Response(200, request=retried))
    later = next(auth.auth_flow(httpx.Request("GET", BLOB)))
    assert later.headers["Authorization"] == expected and looked_up == ["registry.example"]
    # refused with our credentials: no loop, the 401 stands
    flow = auth.auth_flow(httpx.Request("GET", BLOB))
    assert ends(flow, challenge(next(flow), 'Basic realm="registry"'))


def test_basic_challenge_without_credentials_leaves_the_401():
    auth = RegistryAuth()
    flow = auth.auth_flow(httpx.Request("GET", MANIFEST))
    assert ends(flow, challenge(next(flow), 'Basic realm="registry"'))


def test_a_401_from_a_redirect_target_is_not_answered():
    auth = RegistryAuth(lambda host: ("alice", "pw"))
    flow = auth.auth_flow(httpx.Request("GET", BLOB))
    next(flow)
    cdn = httpx.Request("GET", "https://cdn.example/blob?sig=x")
    assert ends(flow, httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="cdn"'}, request=cdn))


# -- concurrency: one token fetch for N requests (a real AsyncClient, a MockTransport) ----------

def registry_handler(counts: dict[str, int], *, token_ok: bool = True):
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            counts["token"] = counts.get("token", 0) + 1
            await trio.sleep(0.05)  # slow enough that every request piles up behind this one
            if not token_ok:
                return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
            return httpx.Response(200, json={"token": f"tok{counts['token']}", "expires_in": 300})
        counts["registry"] = counts.get("registry", 0) + 1
        await trio.sleep(0.01)
        if request.headers.get("authorization", "").startswith("Bearer tok"):
            return httpx.Response(200, content=b"x" * 1000)
        return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})
    return handler


async def test_one_token_fetch_serves_many_concurrent_requests():
    counts: dict[str, int] = {}
    lookups = []
    results = []
    auth = RegistryAuth(lambda host: lookups.append(host) or ("alice", "pw"))
    async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(registry_handler(counts))) as client:
        async def get(i: int) -> None:
            resp = await client.get(f"https://registry.example/v2/a/b/blobs/sha256:{i}")
            results.append((resp.status_code, len(resp.content)))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(get, i)
        assert results == [(200, 1000)] * 20
        assert counts["token"] == 1 and lookups == ["registry.example"]
        # and the next wave goes straight out with the token
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(get, i)
        assert counts["token"] == 1 and counts["registry"] == 20 * 2 + 5


async def test_a_refused_token_fetch_is_not_repeated_by_the_waiters():
    counts: dict[str, int] = {}
    auth = RegistryAuth(lambda host: ("alice", "wrong"))
    statuses = []
    async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(registry_handler(counts, token_ok=False))) as client:
        async def get(i: int) -> None:
            statuses.append((await client.get(f"https://registry.example/v2/a/b/blobs/sha256:{i}")).status_code)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(get, i)
    assert statuses == [401] * 10 and counts["token"] == 1
    assert auth.identity == "as alice"


async def test_a_cancelled_token_fetch_hands_over_to_a_waiter():
    counts: dict[str, int] = {}
    auth = RegistryAuth()
    handler = registry_handler(counts)

    async def slow_token(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            counts["started"] = counts.get("started", 0) + 1
            await trio.sleep(0.3)
        return await handler(request)

    results = []
    async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(slow_token)) as client:
        async def get(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                results.append((await client.get(f"https://registry.example/v2/a/b/blobs/sha256:{i}")).status_code)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                first = await nursery.start(get, 0)
                await trio.sleep(0.05)  # the first request is fetching the token now
                for i in range(1, 4):
                    nursery.start_soon(get, i)
                await trio.sleep(0.1)  # the others got their 401 and wait for that token
                assert counts["started"] == 1
                first.cancel()
    # one waiter took over the fetch; the rest waited for it
    assert results == [200, 200, 200] and counts["started"] == 2 and counts["token"] == 1


async def test_async_token_request_keeps_the_client_timeout():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            seen["timeout"] = request.extensions.get("timeout")
            return httpx.Response(200, json={"token": "abc"})
        if request.headers.get("authorization") != "Bearer abc":
            return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})
        return httpx.Response(200)

    async with httpx.AsyncClient(auth=RegistryAuth(), transport=httpx.MockTransport(handler), timeout=7.0) as client:
        assert (await client.get(MANIFEST)).status_code == 200
    assert seen["timeout"]["read"] == 7.0


def test_sync_client_reads_token_responses():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "abc"})
        if request.headers.get("authorization") != "Bearer abc":
            return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})
        return httpx.Response(200, content=b"ok")

    with httpx.Client(auth=RegistryAuth(), transport=httpx.MockTransport(handler)) as client:
        assert client.get(MANIFEST).content == b"ok"


# -- credentials: where they come from, in which order ------------------------------------------

HOST = "reg.example:5000"


def write_json(path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return {"HOME": str(path), "PATH": "/usr/bin:/bin"}


def test_registry_keys_normalise_as_docker_does():
    assert registry_key("https://index.docker.io/v1/") == "docker.io"
    assert registry_key("registry-1.docker.io") == "docker.io"
    assert registry_key("http://Reg.Example:5000/") == "reg.example:5000"
    assert registry_key("https://reg.example/some/path") == "reg.example"
    assert registry_key("quay.io/org/repo", keep_path=True) == "quay.io/org/repo"
    assert registry_key("https://index.docker.io/v1/", keep_path=True) == "docker.io"


def test_docker_config_auth_forms(home, tmp_path):
    lookup = credentials_for(parse(f"{HOST}/team/app"), environ=home)
    config = tmp_path / "home" / ".docker" / "config.json"
    write_json(config, {"auths": {f"https://{HOST}/": {"auth": b64("alice:pa:ss")}}})
    cred = lookup(HOST)
    assert (cred.username, cred.password) == ("alice", "pa:ss")
    write_json(config, {"auths": {HOST: {"username": "bob", "password": "pw"}}})
    assert (lookup(HOST).username, lookup(HOST).password) == ("bob", "pw")
    write_json(config, {"auths": {HOST: {"auth": b64("carol:"), "identitytoken": "IDT"}}})
    assert (lookup(HOST).username, lookup(HOST).identity_token) == ("carol", "IDT")
    assert lookup("other.example") is None
    # Docker Hub: docker's own key, asked for by the API host
    write_json(config, {"auths": {"https://index.docker.io/v1/": {"auth": b64("hubuser:pw")}}})
    assert credentials_for(parse("alpine"), environ=home)("registry-1.docker.io").username == "hubuser"
    home["DOCKER_CONFIG"] = str(tmp_path / "elsewhere")
    assert credentials_for(parse("alpine"), environ=home)("registry-1.docker.io") is None


def test_containers_auth_json_comes_first_and_the_most_specific_key_wins(home, tmp_path):
    write_json(tmp_path / "home" / ".docker" / "config.json", {"auths": {HOST: {"auth": b64("docker:pw")}}})
    lookup = credentials_for(parse(f"{HOST}/team/app"), environ=home)
    assert lookup(HOST).username == "docker"
    write_json(tmp_path / "home" / ".config" / "containers" / "auth.json",
               {"auths": {HOST: {"auth": b64("podman:pw")}, f"{HOST}/team": {"auth": b64("team:pw")},
                          f"{HOST}/other": {"auth": b64("other:pw")}}})
    assert lookup(HOST).username == "team"
    write_json(tmp_path / "runtime" / "containers" / "auth.json", {"auths": {HOST: {"auth": b64("runtime:pw")}}})
    home["XDG_RUNTIME_DIR"] = str(tmp_path / "runtime")
    assert lookup(HOST).username == "runtime"
    write_json(tmp_path / "override.json", {"auths": {HOST: {"auth": b64("override:pw")}}})
    home["REGISTRY_AUTH_FILE"] = str(tmp_path / "override.json")
    assert lookup(HOST).username == "override"


def test_command_line_wins_but_only_for_the_images_own_registry(home, tmp_path):
    write_json(tmp_path / "home" / ".docker" / "config.json",
               {"auths": {HOST: {"auth": b64("stored:pw")}, "mirror.example": {"auth": b64("mirror:pw")}}})
    lookup = credentials_for(parse(f"{HOST}/team/app"), "cli", "secret", environ=home)
    cred = lookup(HOST)
    assert (cred.username, cred.password, cred.source) == ("cli", "secret", "the command line")
    assert lookup("mirror.example").username == "mirror"
    assert "secret" not in repr(cred) and "secret" not in repr(lookup)


def test_credential_helpers_cred_helpers_then_creds_store_then_auths(home, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for name, user in (("per-host", "helper-user"), ("store", "store-user"), ("token", "<token>")):
        script = bin_dir / f"docker-credential-{name}"
        script.write_text(f'#!/bin/sh\nread -r s; echo "{name} $1 $s" >> {log}\n'
                          f'case "$s" in {HOST}|https://index.docker.io/v1/) '
                          f"printf '{{\"Username\":\"{user}\",\"Secret\":\"S-{name}\"}}';; "
                          '*) echo "credentials not found in native keychain"; exit 1;; esac\n')
        script.chmod(0o755)
    home["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    config = tmp_path / "home" / ".docker" / "config.json"
    write_json(config, {"credHelpers": {HOST: "per-host"}, "credsStore": "store", "auths": {"plain.example": {"auth": b64("plain:pw")}}})
    lookup = credentials_for(parse(f"{HOST}/app"), environ=home)
    assert log.exists() is False  # lazily: nothing ran yet
    cred = lookup(HOST)
    assert (cred.username, cred.password, cred.source) == ("helper-user", "S-per-host", "docker-credential-per-host")
    assert lookup("plain.example").username == "plain"  # the store has nothing: the auths entry counts
    assert lookup("registry-1.docker.io").username == "store-user"  # the store gets docker's name for Hub
    assert log.read_text().splitlines() == [f"per-host get {HOST}", "store get plain.example",
                                            "store get https://index.docker.io/v1/"]
    write_json(config, {"credsStore": "token"})
    cred = lookup(HOST)
    assert (cred.identity_token, cred.password) == ("S-token", "")


def test_broken_or_missing_sources_are_warnings_not_failures(home, tmp_path, caplog):
    config = tmp_path / "home" / ".docker" / "config.json"
    write_json(config, {"credsStore": "does-not-exist"})
    assert credentials_for(parse(f"{HOST}/app"), environ=home)(HOST) is None
    assert "docker-credential-does-not-exist is not on PATH" in caplog.text
    config.write_text("{not json")
    assert credentials_for(parse(f"{HOST}/app"), environ=home)(HOST) is None
    assert "is not valid JSON" in caplog.text


async def test_credential_lookup_runs_once_per_host_and_off_the_trio_thread():
    threads = []
    counts: dict[str, int] = {}

    def lookup(host):
        threads.append(threading.current_thread())
        return ("alice", "pw")

    auth = RegistryAuth(lookup)
    async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(registry_handler(counts))) as client:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(client.get, f"https://registry.example/v2/a/b/blobs/sha256:{i}")
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


# -- TLS ------------------------------------------------------------------------------------------

def test_ssl_context_default_insecure_and_ca_file(tmp_path):
    ctx = ssl_context()
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 0  # the system's CAs
    assert ssl_context(insecure=True) is False
    ca = CA()
    ctx = ssl_context(ca_file=str(ca.write_cert(tmp_path / "ca.pem")))
    assert ctx.cert_store_stats()["x509_ca"] == 1  # --ca-file replaces the system's CAs
    with pytest.raises(ImagefsError, match="--ca-file"):
        ssl_context(ca_file=str(tmp_path / "missing.pem"))


def test_ssl_context_cert_dir(tmp_path):
    ca = CA()
    certs = tmp_path / "certs.d"
    certs.mkdir()
    ca.write_cert(certs / "ca.crt")
    plain = ssl_context().cert_store_stats()["x509_ca"]
    assert ssl_context(cert_dir=str(certs)).cert_store_stats()["x509_ca"] == plain + 1  # added to the system's
    ca.issue("client", usage="client").write(certs / "client.cert", certs / "client.key")
    ctx = ssl_context(cert_dir=str(certs), insecure=True)
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_NONE  # insecure still presents the cert
    (certs / "client.cert").unlink()
    with pytest.raises(ImagefsError, match="no matching client certificate"):
        ssl_context(cert_dir=str(certs))
    with pytest.raises(ImagefsError, match="not a directory"):
        ssl_context(cert_dir=str(tmp_path / "nope"))
