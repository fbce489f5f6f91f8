"""Shared fixtures: one real registry (with a counting, fault-injecting proxy in front) for the
session, the test images pushed into it once, and a fresh cache and mount point per test."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support import Proxy, Registry

SHARED_LAYER_SIZE = 12 * 1024 * 1024  # larger than a first readahead window, so laziness shows


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def proxy(registry):
    with Proxy(registry.host) as p:
        yield p


@pytest.fixture(autouse=True)
def _time_limit(request):
    """No test hangs CI: each runs under an alarm (its module's TEST_TIME_LIMIT, else 300 s)."""
    limit = getattr(request.module, "TEST_TIME_LIMIT", 300)

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {limit}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _fresh_proxy(request):
    """Each test starts with no faults and no recorded hits."""
    if "proxy" in request.fixturenames:
        p = request.getfixturevalue("proxy")
        p.clear_faults()
        p.reset()
    yield


class TestImages:
    """The images the mount tests read, built once and pushed to the session registry."""

    def __init__(self, registry: Registry) -> None:
        shared = im.random_layer(SHARED_LAYER_SIZE, seed=7, path="opt/shared.bin")
        base = im.tar_layer({"etc/os-release": b'NAME="imagefs test"\n', "etc/hostname": b"test\n"})
        amd = im.image([base, shared, im.tar_layer({"etc/arch": b"amd64\n"})], platform={"os": "linux", "architecture": "amd64"})
        arm = im.image([base, shared, im.tar_layer({"etc/arch": b"arm64\n"})],
                       platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
        self.sbom = im.artifact()
        self.oci = im.index([amd, arm, self.sbom])
        self.amd, self.arm, self.shared = amd, arm, shared
        push(registry.host, "test/oci", self.oci, "v1")

        dbase = im.tar_layer({"etc/os-release": b'NAME="docker media types"\n'}, media="docker")
        d_amd = im.image([dbase, im.random_layer(200_000, seed=3, media="docker")], media="docker",
                         platform={"os": "linux", "architecture": "amd64"})
        d_arm = im.image([dbase], media="docker", platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
        self.docker = im.index([d_amd, d_arm], media="docker")
        self.d_amd = d_amd
        push(registry.host, "test/docker", self.docker, "v1")

        self.single = im.image([im.tar_layer({"hello.txt": b"hello\n"})])
        push(registry.host, "test/single", self.single, "v1")


@pytest.fixture(scope="session")
def images(registry) -> TestImages:
    return TestImages(registry)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
