"""Parse image names with the Docker reference grammar.

``alpine`` means ``docker.io/library/alpine:latest``, as ``docker pull`` reads it. A first path
component is a registry host when it contains ``.`` or ``:`` or is ``localhost``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .descriptors import SHA256_RE
from .errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_HOST = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The host to talk to: Docker Hub's API is not served at ``docker.io`` itself."""
        return DOCKER_HUB_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse(text: str) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` saying what is wrong."""
    if not text:
        raise InvalidReference("invalid reference: empty")
    if any(c.isspace() for c in text):
        raise InvalidReference(f"invalid reference {text!r}: has spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if digest.startswith("sha256:") and not SHA256_RE.match(digest):
            raise InvalidReference(f"invalid reference {text!r}: a sha256 digest is 64 lowercase hex digits")
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid reference {text!r}: bad digest {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid reference {text!r}: bad tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DEFAULT_REGISTRY, rest
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if not _PATH_RE.match(path):
        raise InvalidReference(
            f"invalid reference {text!r}: repository {path!r} must be lowercase letters, digits and separators"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)
