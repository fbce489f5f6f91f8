"""One exception tree for imagefs, mapped to an errno at the FUSE edge.

::

    ImagefsError
    ├── InvalidReference      a name that is not a Docker reference, or not oci:DIR[:TAG] -> EINVAL
    ├── ConfigError           a flag or setting we cannot use      -> EINVAL
    │   └── HostsConfigError  a hosts.toml or --mirror (the message names the file and field)
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
    ├── StorageError          the local disk refused: no space, an ingest, a commit's fsync or labels -> EIO
    ├── WriterClosed          the blob's writer ended (aborted, suspended at unmount) before this write
    ├── LayoutError           an oci: directory we will not write into (not an OCI index, not sha256)
    ├── MountError            a mount point we cannot mount on or unmount
    │   └── FuseUnavailable   /dev/fuse cannot be opened: the message says what to do
    ├── EmptyIndex            copy --soci: no layer is a gzip layer big enough for a zTOC
    ├── SeveralErrors         a concurrent walk failed more than once: the first, and how many more
    └── RunError              `imagefs run` cannot start the program (no command, foreign platform, no bwrap)

Which is which matters beyond the message: only a :class:`DigestMismatch` is a failed verification
(the data is discarded); a :class:`StorageError` at commit keeps verified data for a later try.

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


class ConfigError(ImagefsError):
    """A command-line flag, or a file or setting it names, that cannot be used."""

    errno = errno.EINVAL


class HostsConfigError(ConfigError):
    """A hosts.toml or ``--mirror`` that cannot be used; the message names the file and field."""


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


class StorageError(ImagefsError):
    """The local disk refused a write the store needs (ENOSPC, EDQUOT, an xattr it cannot set).

    Not a verification failure: bytes already verified stay where they are."""

    errno = errno.EIO


class WriterClosed(ImagefsError):
    """A write to, or a wait on, a writer that has ended: aborted, suspended, or never committed."""

    errno = errno.EIO


class LayoutError(ImagefsError):
    """An OCI image layout directory that ``copy`` will not write into as it stands."""

    errno = errno.EIO


class MountError(ImagefsError):
    """A mount point that cannot be mounted on or unmounted."""

    errno = errno.EIO


class FuseUnavailable(MountError):
    """``/dev/fuse`` cannot be opened (no module, no permission, no device in a container)."""


class EmptyIndex(ImagefsError):
    """``copy --soci``: no layer of the image is a gzip layer big enough to be worth a zTOC."""


class SeveralErrors(ImagefsError):
    """Several errors of one concurrent walk, told as one line: the first, and a count of the rest."""


class RunError(ImagefsError):
    errno = errno.ENOEXEC
