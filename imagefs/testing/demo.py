"""The project's demo image, built and pushed byte-exact.

    python -m imagefs.testing.demo --registry 127.0.0.1:5000 [--repo demo/imagefs] [--tag latest]

A multi-platform OCI index (linux/amd64, linux/arm64/v8). Each image has three
gzip layers: a base root filesystem shared by both, a small per-arch layer, and a
4 MiB layer of seeded incompressible data (shared too) so that lazy reads show.
Everything is built from constants, so every run pushes the same digests.
"""

from __future__ import annotations

import argparse
import sys

from .images import Blob, FileEntry, Image, Index, image, index, random_layer, tar_layer
from .push import push

PLATFORMS = (
    {"os": "linux", "architecture": "amd64"},
    {"os": "linux", "architecture": "arm64", "variant": "v8"},
)
DATA_PATH = "opt/data/blob.bin"
DATA_SIZE = 4 << 20
DATA_SEED = 20240101

OS_RELEASE = b"""\
NAME="imagefs demo"
ID=imagefs-demo
VERSION_ID=1
PRETTY_NAME="imagefs demo image"
HOME_URL="https://example.invalid/imagefs"
"""
DOC_README = b"""\
imagefs demo image
==================

This file system was never unpacked: imagefs serves each file straight out of
the layer blobs in the registry, fetching only the byte ranges that are read.
Try `cat /etc/os-release`, `cat /etc/arch`, then time reading
/opt/data/blob.bin (4 MiB of random bytes) twice.
"""


def base_layer() -> Blob:
    """A small but real root filesystem, the same for every architecture."""
    return tar_layer({
        "etc/os-release": OS_RELEASE,
        "etc/hostname": b"imagefs-demo\n",
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
                      b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "etc/issue": FileEntry.symlink("os-release"),
        "bin/README": b"No programs here: this image is for reading, not running.\n",
        "root": FileEntry.dir(0o700),
        "tmp": FileEntry.dir(0o1777),
        "usr/share/doc/imagefs/README": DOC_README,
        "README": FileEntry.symlink("usr/share/doc/imagefs/README"),
    })


def arch_layer(arch: str) -> Blob:
    """What differs per platform: proves the mount picked the right manifest."""
    return tar_layer({
        "etc/arch": f"{arch}\n".encode(),
        f"usr/lib/{arch}/hello.txt": f"Hello from the {arch} image.\n".encode(),
    })


def data_layer() -> Blob:
    """4 MiB that gzip cannot shrink: reading it shows what lazy fetching costs."""
    return random_layer(DATA_SIZE, DATA_SEED, path=DATA_PATH)


def build_demo() -> Index:
    """The demo index; identical bytes on every call."""
    base, data = base_layer(), data_layer()
    images: list[Image] = [
        image([base, arch_layer(p["architecture"]), data], platform=p,
              annotations={"org.opencontainers.image.title": "imagefs demo"})
        for p in PLATFORMS
    ]
    return index(images, annotations={"org.opencontainers.image.description": "imagefs demo image"})


def push_demo(registry: str, repo: str = "demo/imagefs", tag: str = "latest") -> str:
    """Push the demo to ``registry`` (host:port, plain HTTP); return the index digest."""
    return push(registry, repo, build_demo(), tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagefs.testing.demo",
                                     description="Build the imagefs demo image and push it.")
    parser.add_argument("--registry", required=True, help="host:port of a plain-HTTP registry")
    parser.add_argument("--repo", default="demo/imagefs")
    parser.add_argument("--tag", default="latest")
    args = parser.parse_args(argv)
    digest = push_demo(args.registry, args.repo, args.tag)
    print(f"{args.registry}/{args.repo}:{args.tag}")
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
