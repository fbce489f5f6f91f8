import pytest

from imagefs.errors import InvalidReference
from imagefs.reference import parse

HEX = "a" * 64


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest, host",
    [
        ("alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io"),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None, "registry-1.docker.io"),
        ("index.docker.io/foo/bar", "docker.io", "foo/bar", "latest", None, "registry-1.docker.io"),
        ("localhost/foo", "localhost", "foo", "latest", None, "localhost"),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None, "localhost:5000"),
        ("127.0.0.1:5000/demo/imagefs", "127.0.0.1:5000", "demo/imagefs", "latest", None, "127.0.0.1:5000"),
        ("ghcr.io/o/r:v1", "ghcr.io", "o/r", "v1", None, "ghcr.io"),
        (f"quay.io/o/r@sha256:{HEX}", "quay.io", "o/r", None, f"sha256:{HEX}", "quay.io"),
        (f"r:t@sha256:{HEX}", "docker.io", "library/r", "t", f"sha256:{HEX}", "registry-1.docker.io"),
    ],
)
def test_normalisation(text, registry, repo, tag, digest, host):
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.host) == (registry, repo, tag, digest, host)
    assert ref.object == (digest or tag)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("Alpine", "lowercase"),
        ("alpine@sha256:abc", "64"),
        ("alpine:bad tag", "spaces"),
        ("a//b", "lowercase"),
        ("alpine:" + "x" * 200, "bad tag"),
    ],
)
def test_bad_references_say_why(text, why):
    with pytest.raises(InvalidReference, match=why):
        parse(text)
