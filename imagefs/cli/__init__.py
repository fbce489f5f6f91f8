"""The ``imagefs`` command line.

``imagefs mount`` returns once the mount is ready and leaves a background process serving it
(``-f`` stays in the foreground); errors are one line on stderr and a non-zero exit code.

- :mod:`.parser` — every verb's flags (:func:`~.parser.build_parser`), the registry flags shared by
  verbs, and the mount flags the mount helper maps ``-o`` options to;
- :mod:`.mount` — ``mount`` (the background launcher and the foreground server) and ``umount``;
- :mod:`.verbs` — what verb runners share: password, logging, ``trio.run``, the registry client.

The other verbs' code lives in their own modules (:mod:`imagefs.pull`, :mod:`imagefs.gc` …).
"""

from __future__ import annotations

import os
import signal
import sys

from ..errors import ImagefsError
from .mount import cmd_mount, cmd_umount
from .parser import build_parser
from .verbs import EXIT_ERROR, EXIT_USAGE

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(raw)
    args.argv = raw
    try:
        if args.verb == "mount":
            return cmd_mount(args)
        if args.verb == "umount":
            return cmd_umount(args)
        if hasattr(args, "run"):
            return args.run(args)
    except ImagefsError as exc:
        print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `imagefs inspect … | head`: the reader has enough; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 128 + signal.SIGPIPE
    return EXIT_USAGE
