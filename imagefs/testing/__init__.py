"""Test and demo support: build OCI/Docker images in memory, byte for byte and
deterministically, and push them to a registry over its plain HTTP API so that
tests know exactly which bytes the registry serves. ``images`` is the builder,
``push`` the pusher, ``demo`` builds and pushes the project's demo image. Nothing here is used by the
mount itself, and nothing here imports the rest of ``imagefs``: the builder must
stay independent of the code it is used to test.
"""
