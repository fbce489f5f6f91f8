"""What the runners of the verbs share: the ``--password-stdin`` password, logging, ``trio.run`` with
registry errors made one line, and the registry client the flags describe.

trio and the registry client are imported where they are used: the parser imports this module.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import ConfigError, ImagefsError, SeveralErrors

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def setup_logging(debug: bool, path: Path | None = None, level: int = logging.INFO) -> None:
    """Log to ``path`` (a background mount) or stderr; ``level`` when not ``debug``."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("imagefs: %(levelname)s: %(message)s" if not debug else
                                               "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level)
    if not debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def read_password(args) -> str | None:
    """The ``--password-stdin`` password, as ``docker login`` reads it (one trailing newline dropped)."""
    if args.username is None and not args.password_stdin:
        return None
    if not (args.username and args.password_stdin):
        raise ConfigError("--username and --password-stdin go together (the password is read from stdin)")
    password = sys.stdin.read()
    password = password[:-1] if password.endswith("\n") else password
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise ConfigError("--password-stdin: no password on stdin")
    return password


def quiet_logging(debug: bool) -> None:
    """Warnings (e.g. the offline fallback) as one ``imagefs: WARNING:`` line; info stays quiet."""
    setup_logging(debug, level=logging.WARNING)


def cache_dir(args) -> Path:
    """``--cache-dir``, else the default cache, resolved."""
    from ..content.layout import default_cache_dir

    return (args.cache_dir or default_cache_dir()).resolve()


def client_for(args, ref_text: str):
    """The registry client a mount with the same flags would use (one place for registry options)."""
    from ..reference import parse
    from ..registry.connect import RegistryOptions, make_client
    from .parser import registry_options

    return make_client(parse(ref_text), RegistryOptions(**registry_options(args, read_password(args))))


def run_verb(main):
    """``trio.run(main)``; several registry errors at once (a concurrent walk) become one, counted."""
    import trio

    try:
        return trio.run(main)
    except BaseExceptionGroup as exc:
        errors = [e for e in exc.exceptions if isinstance(e, (ImagefsError, OSError))]
        if len(errors) != len(exc.exceptions):
            raise
        first = errors[0]
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise SeveralErrors(one_line(first) + more) from exc


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
