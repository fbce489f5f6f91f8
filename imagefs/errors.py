"""One exception tree for imagefs, mapped to an errno at the FUSE edge.

::

    ImagefsError
    ├── InvalidReference      a name that is not a Docker reference
    ├── NotFound              no such tag, manifest or blob        -> ENOENT
    ├── AlreadyExists         the blob is committed already        -> EEXIST
    ├── Unavailable           another writer holds the ref         -> EAGAIN
    ├── Unauthorized          the registry refused us              -> EACCES
    ├── RegistryError         the registry answered badly          -> EIO
    │   └── RegistryUnreachable   no answer at all (DNS, refused, timeout)
    ├── DigestMismatch        bytes do not hash to their digest    -> EIO
    ├── InvalidManifest       JSON we cannot use                   -> EIO
    │   └── UnsupportedMediaType  e.g. Docker schema1
    ├── InvalidLayer          a layer that is not a tar we can read -> EIO
    │   └── InvalidZtoc       a remote zTOC (SOCI) we refuse: the layer is indexed locally
    ├── PlatformNotFound      --platform names none of the index's -> ENOENT
    └── RunError              `imagefs run` cannot start the program (no command, foreign platform, no bwrap)

Lower layers raise the most specific class with ``raise … from exc``; only
:mod:`imagefs.fs.operations` turns them into ``pyfuse3.FUSEError``.
"""

from __future__ import annotations

import errno


class ImagefsError(Exception):
    """Base of every error imagefs raises on purpose; ``errno`` is what a reader sees."""

    errno: int = errno.EIO


class InvalidReference(ImagefsError):
    errno = errno.EINVAL


class NotFound(ImagefsError):
    errno = errno.ENOENT


class AlreadyExists(ImagefsError):
    errno = errno.EEXIST


class Unavailable(ImagefsError):
    errno = errno.EAGAIN


class Unauthorized(ImagefsError):
    errno = errno.EACCES


class RegistryError(ImagefsError):
    errno = errno.EIO


class RegistryUnreachable(RegistryError):
    pass


class DigestMismatch(ImagefsError):
    errno = errno.EIO


class InvalidManifest(ImagefsError):
    errno = errno.EIO


class UnsupportedMediaType(InvalidManifest):
    pass


class InvalidLayer(ImagefsError):
    errno = errno.EIO


class InvalidZtoc(InvalidLayer):
    """A zTOC that is malformed or does not describe its layer."""


class PlatformNotFound(ImagefsError):
    errno = errno.ENOENT


class RunError(ImagefsError):
    errno = errno.ENOEXEC
