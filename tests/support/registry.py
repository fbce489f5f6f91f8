"""Run a real ``docker-registry`` (CNCF distribution 2.x) process for tests.

Why a real process: the package under test must cope with what an actual
registry does (Range answers, upload ``Location`` URLs, error bodies, how it
closes connections); a hand-written fake would only encode our assumptions.

The registry listens on 127.0.0.1 only, stores blobs under ``workdir/storage``
and logs (application log *and* access log, both on stderr) to
``workdir/registry.log``.  :meth:`Registry.stop` followed by
:meth:`Registry.start` brings it back on the same port with the same storage,
so tests can simulate a registry restart.
"""

from __future__ import annotations

import atexit
import errno
import json
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

__all__ = ["Registry", "RegistryError", "free_port", "to_yaml"]

#: How long :meth:`Registry.start` waits for ``GET /v2/`` to answer.
START_TIMEOUT = 20.0
#: How long :meth:`Registry.stop` waits after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0

# Registries still running when the interpreter exits (e.g. a test forgot to
# stop one, or pytest was interrupted) are terminated so they do not outlive
# the test session and keep ports/directories busy.
_RUNNING: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _reap_running() -> None:
    for proc in list(_RUNNING):
        proc.kill()
        proc.wait()


class RegistryError(RuntimeError):
    """The registry could not be started (message includes the log tail)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The usual bind-to-0 trick: there is a tiny window in which someone else
    can take the port, acceptable for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(address: str, port: int) -> bool:
    """True unless something *listens* on the port.

    SO_REUSEADDR (which Go's listener uses too) ignores TIME_WAIT leftovers
    of our own earlier run, so a restart on the same port is not refused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid YAML double-quoted scalar, and quoting
        # everything avoids YAML's surprises ("no" -> false, "1.10" -> float).
        return json.dumps(value)
    raise TypeError(f"cannot render {type(value).__name__} as YAML: {value!r}")


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml_lines(item, indent + 1))
            elif isinstance(item, Mapping):
                lines.append(f"{pad}{key}: {{}}")
            elif isinstance(item, list):
                lines.append(f"{pad}{key}: []")
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (Mapping, list)) and item:
                nested = _yaml_lines(item, indent + 1)
                # "- " takes the place of the first nested line's indentation.
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(f"{pad}{_yaml_scalar(value)}")
    return lines


def to_yaml(config: Mapping[str, Any]) -> str:
    """Render nested dicts/lists/scalars as block YAML (no PyYAML needed)."""
    return "\n".join(_yaml_lines(config, 0)) + "\n"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Registry:
    """A real docker-registry process on a free 127.0.0.1 port with storage under ``workdir``.

    ``extra_config`` is deep-merged into the generated configuration (e.g.
    ``{"proxy": {"remoteurl": "http://..."}}`` for a pull-through cache, or
    ``{"auth": {"token": {...}}}`` for token auth).  ``extra_yaml`` is raw YAML
    appended verbatim, for anything the tiny built-in YAML writer cannot
    express; it must only introduce top-level keys the generated config does
    not already have (``auth:``, ``proxy:``, ``notifications:`` ...).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        extra_yaml: str | None = None,
        executable: str = "docker-registry",
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.extra_config = dict(extra_config or {})
        self.extra_yaml = extra_yaml
        self.executable = executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- addresses and paths -------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (what goes into an image reference)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        """Root directory of the filesystem storage driver.

        ``workdir/storage`` unless ``extra_config`` points it elsewhere (e.g.
        at another registry's storage, to serve the same content).
        """
        filesystem = self.config().get("storage", {}).get("filesystem", {})
        return Path(filesystem.get("rootdirectory", self.workdir / "storage"))

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def log_path(self) -> Path:
        """Combined stdout/stderr of the registry (appended across restarts)."""
        return self.workdir / "registry.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the registry log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # -- configuration -------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration as a dict (before ``extra_yaml`` is appended)."""
        base: dict[str, Any] = {
            "version": "0.1",
            "log": {
                "level": "warn",
                "formatter": "text",
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
                # Don't let the background upload purger touch test state.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                # A fixed secret keeps upload-session state (the HMAC'd
                # ``_state`` in Location URLs) valid across restarts and
                # silences the "No HTTP secret provided" warning.
                "secret": "imagefs-tests-not-a-secret",
            },
        }
        return _deep_merge(base, self.extra_config)

    def config_text(self) -> str:
        text = to_yaml(self.config())
        if self.extra_yaml:
            text += self.extra_yaml.rstrip("\n") + "\n"
        return text

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Write ``config.yml``, start the process, wait until ``GET /v2/`` answers."""
        if self.running:
            raise RegistryError(f"registry on {self.host} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        # Without this check a foreign server on the port would answer our
        # readiness probe and we would happily test against it.
        if not _port_is_free(self.host.rpartition(":")[0], self.port):
            raise RegistryError(f"port {self.port} is already in use")
        self.config_path.write_text(self.config_text())
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.executable, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        _RUNNING.add(self._proc)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error: str = "no attempt"
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RegistryError(
                        f"docker-registry exited with status {code} during startup; "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    resp = client.get(f"{self.url}/v2/")
                except httpx.HTTPError as exc:
                    last_error = repr(exc)
                else:
                    if "docker-distribution-api-version" in resp.headers:
                        return
                    last_error = f"HTTP {resp.status_code} without registry header"
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"docker-registry on {self.host} not ready after "
                        f"{START_TIMEOUT:.0f}s (last: {last_error}); "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL.  Idempotent; ``start()`` may follow."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            _RUNNING.discard(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Registry {self.url} {state} workdir={self.workdir}>"
