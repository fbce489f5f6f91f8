"""imagefs: mount a container image straight from an OCI registry, fetching bytes only when read.

How the package is layered, from the bottom up:

- :mod:`imagefs.errors` — the one exception tree; each class carries the errno a reader sees.
- :mod:`imagefs.reference` — Docker reference grammar (``alpine`` → ``docker.io/library/alpine:latest``).
- :mod:`imagefs.descriptors` — descriptors, media types, containerd's ref keys, manifest decoding.
- :mod:`imagefs.registry` — the httpx client: auth flow, the transport (hosts, retries, errors,
  counters), the protocol (resolve, manifests, ranged blob streams), clients from the shared flags.
- :mod:`imagefs.content` — the content store (cache): its capabilities as protocols
  (:mod:`~imagefs.content.store`: Provider, Ingester, Writer, Manager), the local store with its
  per-ref writer locks (in process and, by flock, across processes), resumable sparse ingests,
  digest-checked commits and gc labels as ``user.`` xattrs; the cache's paths
  (:mod:`~imagefs.content.layout`) and label names (:mod:`~imagefs.content.labels`).
- :mod:`imagefs.handlers` — the port of containerd's ``remotes/handlers.go``: ``fetch`` with
  jittered backoff on a locked ref, labels from a tee of the stream, a concurrent ``dispatch``.
- :mod:`imagefs.image` — the descriptor graph of one mount, discovered as it is walked.
- :mod:`imagefs.blobranges` — the filesystem's one entry for blob bytes (``read`` served bytes,
  ``span`` whole verified pieces); :mod:`imagefs.reader` implements it, serving byte ranges as
  they stream in, and :mod:`imagefs.blobfetch` is one blob's fetch in flight (claims, requests,
  the commit).
- :mod:`imagefs.layers` — the files inside layers: tar indexes, gzip checkpoints, whiteouts.
- :mod:`imagefs.statistics` — every part's counters in the mount's ``user.imagefs.statistics``.
- :mod:`imagefs.fs` — the FUSE side: inode tree, pyfuse3 operations (the errno boundary), mount.
- :mod:`imagefs.pull`, :mod:`imagefs.inspect`, :mod:`imagefs.gc`, :mod:`imagefs.fsck`,
  :mod:`imagefs.status`, :mod:`imagefs.rm` — the cache verbs (``pull``, ``inspect``, ``gc``, ``fsck``,
  ``ls``, ``rm``); :mod:`imagefs.progress` shows a pull's (and a copy's) progress;
  :mod:`imagefs.content.maintenance` holds the store walks they share, :mod:`imagefs.content.mounts`
  the live-mount records (leases).
- :mod:`imagefs.copy` — ``copy``: an image to a registry or an OCI layout, digests kept
  (:mod:`imagefs.copysource` where each blob's bytes come from, :mod:`imagefs.ocilayout` the layout
  destination, :mod:`imagefs.sociconvert` ``--soci``).
- :mod:`imagefs.run` — ``run``: an image's program in its rootfs, under :mod:`imagefs.sandbox`.
- :mod:`imagefs.mounthelper` — ``mount -t fuse.imagefs`` and ``/etc/fstab``.
- :mod:`imagefs.cli` — the ``imagefs`` command: :mod:`~imagefs.cli.parser` (every verb's flags),
  :mod:`~imagefs.cli.mount` (``mount``/``umount``), :mod:`~imagefs.cli.verbs` (what verb runners share).
- :mod:`imagefs.testing` — builds (:mod:`~imagefs.testing.images`) and pushes
  (:mod:`~imagefs.testing.push`) test and demo images; the mount never imports it.
"""

__version__ = "0.1.0"
