import json

import pytest

from imagefs import descriptors as d
from imagefs.errors import DigestMismatch, InvalidManifest, UnsupportedMediaType

DIG = "sha256:" + "b" * 64


def desc(mt, digest=DIG, size=1):
    return d.Descriptor(mt, digest, size)


@pytest.mark.parametrize(
    "mt, kind",
    [
        (d.DOCKER_MANIFEST, "manifest"), (d.OCI_MANIFEST, "manifest"),
        (d.DOCKER_MANIFEST_LIST, "index"), (d.OCI_INDEX, "index"),
        (d.DOCKER_CONFIG, "config"), (d.OCI_CONFIG, "config"),
        (d.DOCKER_LAYER_GZIP, "layer"), (d.DOCKER_LAYER, "layer"), (d.DOCKER_LAYER_FOREIGN, "layer"),
        (d.DOCKER_LAYER_FOREIGN_GZIP, "layer"), (d.OCI_LAYER, "layer"), (d.OCI_LAYER_GZIP, "layer"),
        (d.OCI_LAYER_ZSTD, "layer"), (d.OCI_LAYER_NONDIST, "layer"), (d.OCI_LAYER_NONDIST_GZIP, "layer"),
        ("application/vnd.in-toto+json", "unknown"), ("application/vnd.example.sbom.v1+json", "unknown"),
    ],
)
def test_ref_key_is_make_ref_key(mt, kind):
    assert d.ref_key(desc(mt)) == f"{kind}-{DIG}"


def test_manifest_children_config_first_then_layers():
    layers = [{"mediaType": d.OCI_LAYER_GZIP, "digest": "sha256:" + c * 64, "size": 3} for c in "cd"]
    body = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST,
                       "config": {"mediaType": d.OCI_CONFIG, "digest": DIG, "size": 2}, "layers": layers}).encode()
    kids = d.children(desc(d.OCI_MANIFEST, size=len(body)), body)
    assert [k.ref_key for k in kids] == [f"config-{DIG}", "layer-sha256:" + "c" * 64, "layer-sha256:" + "d" * 64]


def test_index_children_keep_platform():
    body = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": d.OCI_MANIFEST, "digest": DIG, "size": 5, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}).encode()
    (kid,) = d.children(desc(d.OCI_INDEX), body)
    assert str(kid.platform) == "linux/arm64/v8"
    assert d.Platform.parse("linux/arm64").matches(kid.platform)
    assert d.Platform.parse("linux/arm64/v8").matches(d.Platform("linux", "arm64"))
    assert not d.Platform.parse("linux/amd64").matches(kid.platform)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"not json", "invalid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"layers": 3, "config": {}}', "no layers"),
        (json.dumps({"config": {"mediaType": "x", "digest": "md5:00", "size": 1}, "layers": []}).encode(), "digest"),
        (json.dumps({"config": {"mediaType": "x", "digest": DIG, "size": -1}, "layers": []}).encode(), "size"),
        (json.dumps({"mediaType": d.OCI_INDEX, "manifests": []}).encode(), "body says"),
    ],
)
def test_bad_manifests_are_invalid(body, match):
    with pytest.raises(InvalidManifest, match=match):
        d.children(desc(d.OCI_MANIFEST), body)


def test_schema1_refused_naming_the_media_type():
    with pytest.raises(UnsupportedMediaType, match="manifest.v1"):
        d.check_supported(d.DOCKER_SCHEMA1_SIGNED)
    with pytest.raises(UnsupportedMediaType, match="schema1"):
        d.children(desc(d.OCI_MANIFEST), json.dumps({"schemaVersion": 1, "mediaType": d.DOCKER_SCHEMA1}).encode())


def test_verify():
    data = b"hello"
    good = d.Descriptor(d.OCI_CONFIG, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", 5)
    d.verify(good, data)
    with pytest.raises(DigestMismatch):
        d.verify(good, b"hellO")
    with pytest.raises(DigestMismatch):
        d.verify(good, b"hello!")
