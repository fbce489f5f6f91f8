"""The registry auth flow, driven by hand (next/send) and through httpx with a MockTransport."""

import httpx

from imagefs.registry.auth import RegistryAuth, parse_challenge

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
