"""Issue 4, auth half, end to end: real ``docker-registry`` processes behind token auth, htpasswd
and TLS, mounted through the real command line with credentials where users keep them.

The images are pushed once into a plain registry; every auth-protected registry here serves the
same storage directory, so no test has to push through auth. Each test gets its own ``$HOME``
(no ``~/.docker``, no ``auth.json`` unless it writes one) and passes it to ``imagefs`` only.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import bcrypt
import httpx
import pytest

from imagefs.registry.auth import RegistryAuth
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support import Registry
from tests.support.tls import CA, TLSRegistry
from tests.support.tokenserver import Rule, TokenServer

IMAGEFS = [sys.executable, "-m", "imagefs"]
TIMEOUT = 60

# Fresh per run, so a grep for them can only find what this run leaked.
ALICE_PW = "alice-pw-" + secrets.token_hex(12)
BOB_PW = "bob-pw-" + secrets.token_hex(12)
IDENTITY_TOKEN = "identity-" + secrets.token_hex(16)


# -- fixtures: images, the issuer, the registries -------------------------------------------------

class Images:
    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.public = im.image([im.tar_layer({"hello.txt": b"public\n"})])
        self.private = im.image([im.tar_layer({"secret.txt": b"private\n"}), im.random_layer(300_000, seed=41)])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Images:
    workdir = tmp_path_factory.mktemp("seed")
    imgs = Images(workdir / "storage")
    with Registry(workdir) as seed:
        push(seed.host, "public/app", imgs.public, "v1")
        push(seed.host, "private/app", imgs.private, "v1")
    return imgs


def _storage(images: Images) -> dict:
    return {"storage": {"filesystem": {"rootdirectory": str(images.storage)}}}


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    rules = [Rule(None, "public/*", frozenset({"pull"})), Rule("alice", "*", frozenset({"pull", "push"}))]
    with TokenServer(tmp_path_factory.mktemp("tokens"), users={"alice": ALICE_PW, "bob": BOB_PW}, rules=rules,
                     refresh_tokens={IDENTITY_TOKEN: "alice"}) as server:
        yield server


@pytest.fixture
def tokens(issuer):
    issuer.reset()
    return issuer


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory, images, issuer):
    with Registry(tmp_path_factory.mktemp("token-registry"), extra_config={**issuer.registry_config(), **_storage(images)}) as reg:
        yield reg


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, images, ca):
    """htpasswd basic auth over TLS, as distribution's docs insist it be deployed."""
    workdir = tmp_path_factory.mktemp("basic-registry")
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(ALICE_PW.encode(), bcrypt.gensalt(4)).decode()}\n")
    config = {"auth": {"htpasswd": {"realm": "imagefs-basic", "path": str(htpasswd)}}, **_storage(images)}
    with TLSRegistry(workdir, ca, extra_config=config) as reg:
        yield reg


@pytest.fixture(scope="module")
def client_ca() -> CA:
    return CA("imagefs test client CA")


@pytest.fixture(scope="module")
def mtls_registry(tmp_path_factory, images, ca, client_ca):
    with TLSRegistry(tmp_path_factory.mktemp("mtls-registry"), ca, client_ca=client_ca, extra_config=_storage(images)) as reg:
        yield reg


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """An environment whose $HOME holds no credentials, and no auth variables."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME")}
    clean["HOME"] = str(home)
    return clean


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# -- helpers ------------------------------------------------------------------------------------

def docker_config(env: dict[str, str], doc: dict) -> Path:
    path = Path(env["HOME"]) / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def run(*args, env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True, env=env,
                          input=input, timeout=TIMEOUT, stdin=None if input is not None else subprocess.DEVNULL)


@contextmanager
def mounted(ref: str, mnt: Path, cache: Path, *args, env: dict[str, str], input: str | None = None):
    """``imagefs mount`` (asserting it worked), yield its result, always unmount."""
    mnt.mkdir(exist_ok=True)
    log = mnt.parent / f"{mnt.name}.log"
    done = run("mount", ref, mnt, "--cache-dir", cache, "--log-file", log, *args, env=env, input=input)
    try:
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mnt)
        yield done
    finally:
        unmount(mnt, log)


def unmount(mnt: Path, log: Path) -> None:
    if os.path.ismount(mnt):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and log.exists() and "unmounted" not in log.read_text():
        time.sleep(0.05)


def refused(ref: str, mnt: Path, cache: Path, *args, env: dict[str, str], input: str | None = None) -> str:
    """``imagefs mount`` that must fail: exit 1, one line on stderr, no mount. Returns the line."""
    mnt.mkdir(exist_ok=True)
    done = run("mount", ref, mnt, "--cache-dir", cache, *args, env=env, input=input)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        raise AssertionError(f"mount of {ref} should have failed")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def reads_back(mnt: Path, image: im.Image) -> None:
    """The mount serves the image byte for byte (manifest, config, every layer)."""
    assert (mnt / "root" / "blob").read_bytes() == image.manifest.data
    assert (mnt / f"config-{image.config.digest}" / "blob").read_bytes() == image.config.data
    for layer in image.layers:
        assert (mnt / f"layer-{layer.digest}" / "blob").read_bytes() == layer.data


# -- token auth ---------------------------------------------------------------------------------

def test_anonymous_pull_of_a_public_repo_costs_one_token(token_registry, tokens, images, tmp_path, env, cache):
    with mounted(f"{token_registry.host}/public/app:v1", tmp_path / "mnt", cache, env=env):
        reads_back(tmp_path / "mnt", images.public)
    fetches = tokens.fetches()
    # resolve, manifest, config and layer all ride on one anonymous token
    assert [(r.method, r.account, r.scopes) for r in fetches] == [("GET", None, ["repository:public/app:pull"])]


def test_private_repo_with_credentials_from_docker_config(token_registry, tokens, images, tmp_path, env, cache):
    docker_config(env, {"auths": {f"http://{token_registry.host}": {"auth": b64(f"alice:{ALICE_PW}")}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env):
        reads_back(tmp_path / "mnt", images.private)
    assert [(r.method, r.account) for r in tokens.fetches()] == [("GET", "alice")]


def test_private_repo_anonymously_is_access_denied(token_registry, tokens, tmp_path, env, cache):
    line = refused(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env)
    assert line.startswith(f"imagefs: access denied to {token_registry.host}/private/app (anonymous)"), line


def test_wrong_password_is_one_clear_line_naming_the_user(token_registry, tokens, tmp_path, env, cache):
    wrong = "not-" + ALICE_PW
    docker_config(env, {"auths": {token_registry.host: {"username": "alice", "password": wrong}}})
    line = refused(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env)
    assert line.startswith(f"imagefs: access denied to {token_registry.host}/private/app (as alice)"), line
    assert wrong not in line and b64(f"alice:{wrong}") not in line
    assert [r.status for r in tokens.requests] == [401]  # asked once, not once per request


def test_user_without_a_grant_is_denied_as_that_user(token_registry, tokens, tmp_path, env, cache):
    docker_config(env, {"auths": {token_registry.host: {"auth": b64(f"bob:{BOB_PW}")}}})
    line = refused(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env)
    assert f"access denied to {token_registry.host}/private/app (as bob)" in line, line
    assert [(r.account, r.status) for r in tokens.requests] == [("bob", 200)]  # a token, just no access in it


def test_realm_refusing_get_gets_the_oauth2_password_form(token_registry, tokens, images, tmp_path, env, cache):
    tokens.allow_get = False
    docker_config(env, {"auths": {token_registry.host: {"auth": b64(f"alice:{ALICE_PW}")}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env):
        reads_back(tmp_path / "mnt", images.private)
    assert [(r.method, r.status) for r in tokens.requests] == [("GET", 405), ("POST", 200)]
    post = tokens.requests[1]
    assert (post.grant_type, post.client_id, post.params["username"]) == ("password", "imagefs", "alice")
    assert post.params["service"] == "imagefs-test-registry"
    assert post.scopes == ["repository:private/app:pull"]


def test_identity_token_uses_the_refresh_token_grant(token_registry, tokens, images, tmp_path, env, cache):
    docker_config(env, {"auths": {token_registry.host: {"auth": b64("alice:"), "identitytoken": IDENTITY_TOKEN}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, "--debug", env=env):
        reads_back(tmp_path / "mnt", images.private)
    assert [(r.method, r.grant_type, r.account) for r in tokens.fetches()] == [("POST", "refresh_token", "alice")]
    assert "POST http://" in (tmp_path / "mnt.log").read_text()
    assert IDENTITY_TOKEN not in (tmp_path / "mnt.log").read_text()


def test_credential_helper_named_by_creds_store(token_registry, tokens, images, tmp_path, env, cache):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "helper-calls"
    helper = bin_dir / "docker-credential-test"
    helper.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r server || true
echo "$server" >> {calls}
if [ "$server" = "{token_registry.host}" ]; then
  printf '{{"ServerURL":"%s","Username":"alice","Secret":"{ALICE_PW}"}}' "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi
""")
    helper.chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    docker_config(env, {"credsStore": "test", "auths": {token_registry.host: {}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env):
        reads_back(tmp_path / "mnt", images.private)
    assert calls.read_text().splitlines() == [token_registry.host]  # asked once, lazily, for this host
    assert [r.account for r in tokens.fetches()] == ["alice"]


def test_password_stdin_beats_stored_credentials(token_registry, tokens, images, tmp_path, env, cache):
    # a stale password in config.json must not win over the one given on the command line
    docker_config(env, {"auths": {token_registry.host: {"auth": b64("alice:stale-password")}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache,
                 "--username", "alice", "--password-stdin", env=env, input=ALICE_PW + "\n") as done:
        reads_back(tmp_path / "mnt", images.private)
        # the password travelled over a pipe: not in any process's command line or environment
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            assert ALICE_PW.encode() not in cmdline and ALICE_PW.encode() not in environ, pid
    assert ALICE_PW not in done.stderr
    assert [r.account for r in tokens.fetches()] == ["alice"]


def test_containers_auth_json_is_used_and_comes_before_docker_config(token_registry, tokens, images, tmp_path, env, cache):
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {f"{token_registry.host}/private": {"auth": b64(f"alice:{ALICE_PW}")}}}))
    env["REGISTRY_AUTH_FILE"] = str(auth_file)
    docker_config(env, {"auths": {token_registry.host: {"auth": b64("alice:stale-password")}}})
    with mounted(f"{token_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env):
        reads_back(tmp_path / "mnt", images.private)
    assert [(r.account, r.status) for r in tokens.requests] == [("alice", 200)]


def test_no_secret_in_debug_logs_xattrs_or_cache(token_registry, tokens, images, tmp_path, env, cache):
    docker_config(env, {"auths": {token_registry.host: {"auth": b64(f"alice:{ALICE_PW}")}}})
    mnt, log = tmp_path / "mnt", tmp_path / "mnt.log"
    with mounted(f"{token_registry.host}/private/app:v1", mnt, cache, "--debug", env=env):
        reads_back(mnt, images.private)
        attrs = subprocess.run(["getfattr", "-d", "-m", "-", "-R", "--absolute-names", str(mnt)],
                               capture_output=True, text=True, timeout=20).stdout
        for blob in (images.private.manifest, images.private.config, *images.private.layers):
            assert f'user.imagefs.digest="{blob.digest}"' in attrs  # the dump is real and complete
    text = log.read_text()
    assert "HTTP Request: GET" in text and "/token?" in text  # --debug really logged the token requests
    issued = tokens.issued[-1]
    secrets_ = [ALICE_PW, b64(f"alice:{ALICE_PW}"), issued, issued.split(".")[2], "Bearer ey", "Basic "]
    for secret in secrets_:
        assert secret not in text, f"{secret[:12]}… is in the log"
        assert secret not in attrs, f"{secret[:12]}… is in an xattr"
        found = subprocess.run(["grep", "-rlF", secret, str(cache)], capture_output=True, text=True)
        assert found.returncode == 1, f"{secret[:12]}… is in the cache: {found.stdout}"


# -- basic auth and TLS -------------------------------------------------------------------------

def test_htpasswd_basic_auth_over_tls_with_ca_file(basic_registry, images, tmp_path, env, cache):
    mnt = tmp_path / "mnt"
    with mounted(f"{basic_registry.host}/private/app:v1", mnt, cache, "--ca-file", basic_registry.ca_path,
                 "--username", "alice", "--password-stdin", "--debug", env=env, input=ALICE_PW):
        reads_back(mnt, images.private)
    text = (tmp_path / "mnt.log").read_text()
    assert f"basic auth to {basic_registry.host} as alice" in text
    assert ALICE_PW not in text and b64(f"alice:{ALICE_PW}") not in text


def test_basic_auth_wrong_password_is_denied_as_the_user(basic_registry, tmp_path, env, cache):
    line = refused(f"{basic_registry.host}/private/app:v1", tmp_path / "mnt", cache, "--ca-file", basic_registry.ca_path,
                   "--username", "alice", "--password-stdin", env=env, input="wrong")
    assert f"access denied to {basic_registry.host}/private/app (as alice)" in line, line


def test_tls_without_the_ca_is_a_certificate_error(basic_registry, tmp_path, env, cache):
    line = refused(f"{basic_registry.host}/private/app:v1", tmp_path / "mnt", cache, env=env)
    assert f"cannot reach registry {basic_registry.host}: TLS certificate verify failed" in line, line
    assert "--ca-file" in line, line  # and says what fixes it


def test_insecure_skips_verification_and_says_so(basic_registry, images, tmp_path, env, cache):
    docker_config(env, {"auths": {basic_registry.host: {"auth": b64(f"alice:{ALICE_PW}")}}})
    mnt = tmp_path / "mnt"
    with mounted(f"{basic_registry.host}/private/app:v1", mnt, cache, "--insecure", env=env) as done:
        reads_back(mnt, images.private)
    assert "WARNING" in done.stderr.upper() and "NOT verified" in done.stderr, done.stderr


def test_client_certificate_from_cert_dir(mtls_registry, client_ca, ca, images, tmp_path, env, cache):
    certs = tmp_path / "certs.d"
    certs.mkdir()
    ca.write_cert(certs / "ca.crt")  # *.crt are CAs, on top of the system's
    line = refused(f"{mtls_registry.host}/public/app:v1", tmp_path / "mnt", cache, "--cert-dir", certs, env=env)
    assert mtls_registry.host in line and "client certificate" in line, line  # refused without one
    client_ca.issue("imagefs client", usage="client").write(certs / "client.cert", certs / "client.key")
    with mounted(f"{mtls_registry.host}/public/app:v1", tmp_path / "mnt", cache, "--cert-dir", certs, env=env):
        reads_back(tmp_path / "mnt", images.public)


def test_sync_client_pushes_and_pulls_through_token_auth(token_registry, tokens):
    """The same flow in a plain ``httpx.Client``: push (a pull,push scope) and pull back."""
    image = im.image([im.tar_layer({"pushed.txt": b"through token auth\n"})])
    with httpx.Client(auth=RegistryAuth(lambda host: ("alice", ALICE_PW)), timeout=30) as client:
        push(token_registry.host, "private/pushed", image, "v1", client=client)
        resp = client.get(f"{token_registry.url}/v2/private/pushed/manifests/v1", headers={"Accept": im.OCI_MANIFEST})
    assert resp.status_code == 200 and resp.content == image.manifest.data
    scopes = {scope for r in tokens.fetches() for scope in r.scopes}
    # the registry names the actions in either order (a Go map): compare them as a set
    actions = [set(scope.rsplit(":", 1)[1].split(",")) for scope in scopes if scope.startswith("repository:private/pushed:")]
    assert {"pull", "push"} in actions and {r.account for r in tokens.fetches()} == {"alice"}
