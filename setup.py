"""Only the C part lives here; everything else is in pyproject.toml.

``imagefs.fs._passthrough`` is an LD_PRELOAD shim that lets a mount hand committed blobs to the
kernel (FUSE passthrough) on libfuse builds that predate it. It is optional: without a compiler
the install succeeds and mounts serve every read themselves.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("imagefs.fs._passthrough", ["imagefs/fs/_passthrough.c"], optional=True)])
