"""``imagefs run`` end to end: real images built from this machine's binaries, a real registry,
real mounts, bubblewrap, real programs; what is left behind is read from /proc."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import signal
import subprocess
import tarfile
import termios
import time
from pathlib import Path

import pytest

from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support import hostimage as hi
from tests.support.mounting import IMAGEFS, running

TEST_TIME_LIMIT = 120
PROGRAMS = (*hi.BASIC, "wc", "tr", "grep", "true")


class RunImages:
    def __init__(self, registry) -> None:
        self.host = registry.host
        self.layer = hi.host_layer(PROGRAMS, extra={"etc/motd": b"from the image\n",
                                                    "home/app": im.FileEntry.dir(0o755, uid=1000, gid=1000)})
        app = im.tar_layer({"app/greet": im.FileEntry.file(b"#!/bin/sh\necho \"$GREETING, $*\" from $(pwd)\n", 0o755)})
        self.push("run/app", [self.layer, app], entrypoint=["/app/greet"], cmd=["world"],
                  env=["PATH=/usr/bin:/bin", "GREETING=hello"], workdir="/etc")
        self.push("run/plain", [self.layer], cmd=["cat", "/etc/motd"], env=["PATH=/usr/bin:/bin"])
        self.push("run/user", [self.layer], cmd=["id"], user="app")
        self.push("run/nocmd", [self.layer])
        arm = im.image([self.layer], platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
                       config_extra=hi.run_config(cmd=["true"]))
        push(self.host, "run/arm", arm, "v1")

    def push(self, repo: str, layers: list[im.Blob], **config) -> None:
        push(self.host, repo, im.image(layers, config_extra=hi.run_config(**config)), "v1")

    def ref(self, repo: str) -> str:
        return f"{self.host}/{repo}:v1"


@pytest.fixture(scope="module")
def rimages(registry) -> RunImages:
    return RunImages(registry)


def run(cache_dir: Path, *args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*IMAGEFS, "run", "--cache-dir", str(cache_dir), *args], input=input, capture_output=True,
                          text=True, timeout=90, env=env)


def leftovers(pid: int) -> tuple[list[str], list[Path]]:
    """Mounts under the scratch directories of run ``pid``, and those directories."""
    dirs = list(Path("/tmp").glob(f"imagefs-run-{pid}-*"))
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if f"imagefs-run-{pid}-" in line]
    return mounts, dirs


def processes(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry))
    return found


def wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- the config, the command line -------------------------------------------------------------------


def test_entrypoint_cmd_env_workdir_apply(rimages, cache_dir):
    done = run(cache_dir, rimages.ref("run/app"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello, world from /etc\n", "")
    done = run(cache_dir, "-e", "GREETING=hi", "-w", "/usr", rimages.ref("run/app"), "--", "there", "you")
    assert done.stdout == "hi, there you from /usr\n"
    done = run(cache_dir, "--entrypoint", "sh", rimages.ref("run/app"), "--", "-c", "echo $GREETING $PATH $HOME; pwd")
    assert done.stdout == "hello /usr/bin:/bin /root\n/etc\n"
    done = run(cache_dir, rimages.ref("run/plain"))
    assert (done.returncode, done.stdout) == (0, "from the image\n")


def test_user_applies(rimages, cache_dir):
    done = run(cache_dir, rimages.ref("run/user"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("uid=1000(app) gid=1000(app)")
    assert run(cache_dir, rimages.ref("run/user"), "--", "sh", "-c", "echo $HOME").stdout == "/home/app\n"


def test_exit_status_and_signals(rimages, cache_dir):
    ref = rimages.ref("run/plain")
    assert run(cache_dir, ref, "--", "sh", "-c", "exit 3").returncode == 3
    assert run(cache_dir, ref, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    assert run(cache_dir, ref, "--", "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL
    assert run(cache_dir, ref, "--", "no-such-program").returncode != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_imagefs_run_reaches_the_program(rimages, cache_dir, signum):
    script = f"trap 'echo caught; exit 7' {signal.Signals(signum).name[3:]}; echo ready; while :; do sleep 0.1; done"
    proc = subprocess.Popen([*IMAGEFS, "run", "--cache-dir", str(cache_dir), rimages.ref("run/plain"), "--", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (7, "caught\n"), err
    assert leftovers(proc.pid) == ([], [])


def test_stdin_passes_through(rimages, cache_dir):
    data = "".join(f"line {i}\n" for i in range(5000))
    done = run(cache_dir, rimages.ref("run/plain"), "--", "sh", "-c", "tr a-z A-Z | wc -l", input=data)
    assert (done.returncode, done.stdout.strip()) == (0, "5000")
    done = run(cache_dir, rimages.ref("run/plain"), "--", "cat", input=data)
    assert done.stdout == data


def test_terminal_and_ctrl_c(rimages, cache_dir):
    """On a terminal: the program sees a tty, and a Ctrl-C typed there reaches it."""
    master, slave = pty.openpty()

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # the trap is set before "tty" is printed, so the Ctrl-C sent on seeing it cannot beat the trap
    script = "trap 'echo interrupted; exit 5' INT; test -t 0 && test -t 1 && echo tty; while :; do sleep 0.1; done"
    proc = subprocess.Popen([*IMAGEFS, "run", "--cache-dir", str(cache_dir), rimages.ref("run/plain"), "--", "sh", "-c", script],
                            stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
    os.close(slave)
    seen = b""
    while b"tty" not in seen:
        seen += os.read(master, 1024)
    os.write(master, b"\x03")
    while b"interrupted" not in seen:
        seen += os.read(master, 1024)
    assert proc.wait(timeout=60) == 5
    os.close(master)


# -- what the program sees ----------------------------------------------------------------------------


def test_image_read_only_tmp_writable(rimages, cache_dir):
    script = ("touch /etc/motd 2>/dev/null && echo etc-writable; touch /new 2>/dev/null && echo root-writable; "
              "echo t > /tmp/t && cat /tmp/t; cat /etc/motd")
    done = run(cache_dir, rimages.ref("run/plain"), "--", "sh", "-c", script)
    assert (done.returncode, done.stdout) == (0, "t\nfrom the image\n")


def test_writable_overlay_keeps_nothing(rimages, cache_dir):
    ref = rimages.ref("run/plain")
    script = "echo changed > /etc/motd && mkdir /opt2 && echo n > /opt2/new && rm /usr/bin/id && cat /etc/motd /opt2/new; test -e /usr/bin/id || echo id-gone"
    done = run(cache_dir, "--writable", ref, "--", "sh", "-c", script)
    assert (done.returncode, done.stdout) == (0, "changed\nn\nid-gone\n"), done.stderr
    done = run(cache_dir, ref, "--", "sh", "-c", "cat /etc/motd; ls /opt2 2>/dev/null; test -x /usr/bin/id && echo id-back")
    assert done.stdout == "from the image\nid-back\n"
    assert not list(cache_dir.rglob("opt2")) and not list(cache_dir.rglob("new"))


def test_proc_dev_resolv_and_binds(rimages, cache_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.txt").write_text("host data\n")
    (tmp_path / "out").mkdir()
    script = ("grep -c ^Pid: /proc/self/status; ls /proc/1/cmdline >/dev/null && echo proc; "
              "echo x > /dev/null && head -c 8 /dev/urandom | wc -c; test -c /dev/zero && echo dev; "
              "cat /etc/resolv.conf | head -1; cat /data/in/data.txt; echo w > /data/out/w; "
              "echo no > /data/in/no 2>/dev/null || echo ro")
    done = run(cache_dir, "-v", f"{tmp_path / 'in'}:/data/in:ro", "-v", f"{tmp_path / 'out'}:/data/out",
               rimages.ref("run/plain"), "--", "sh", "-c", script)
    resolv = Path("/etc/resolv.conf").read_text().splitlines()[:1] or [""]
    assert done.stdout.splitlines() == ["1", "proc", "8", "dev", resolv[0], "host data", "ro"], done.stderr
    assert (tmp_path / "out" / "w").read_text() == "w\n"
    assert not (tmp_path / "in" / "no").exists()


def test_pid_namespace_shows_only_the_sandbox(rimages, cache_dir):
    done = run(cache_dir, rimages.ref("run/plain"), "--", "sh", "-c", "ls /proc | grep -c '^[0-9]'; echo $$")
    count, pid = done.stdout.split()
    assert pid == "2" and int(count) <= 4  # bwrap's init, sh, ls and grep: no host process


# -- nothing left behind ------------------------------------------------------------------------------


def test_nothing_left_after_exit(rimages, cache_dir):
    proc = subprocess.Popen([*IMAGEFS, "run", "--cache-dir", str(cache_dir), rimages.ref("run/plain"), "--", "sh", "-c",
                             "sleep 987 & echo started"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "started\n")
    assert leftovers(proc.pid) == ([], [])
    assert processes("sleep 987") == []  # the background child went with the pid namespace
    assert processes(f"imagefs-run-{proc.pid}-") == []
    assert list((cache_dir / "mounts").glob("*.json")) == []


def test_nothing_left_after_kill_9(rimages, cache_dir):
    proc = subprocess.Popen([*IMAGEFS, "run", "--cache-dir", str(cache_dir), rimages.ref("run/plain"), "--", "sh", "-c",
                             "echo ready; sleep 986"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    mounts, dirs = leftovers(proc.pid)
    assert len(mounts) == 1 and "fuse.imagefs" in mounts[0] and len(dirs) == 1
    server = [pid for pid in processes(f"imagefs-run-{proc.pid}-") if pid in processes("imagefs mount")]
    assert len(server) == 1 and processes("sleep 986")
    stat = Path(f"/proc/{server[0]}/stat").read_text().rsplit(")", 1)[1].split()
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not running((server[0], stat[19])))  # the mount saw its parent go, and exited
    assert wait_until(lambda: processes("sleep 986") == [])
    assert leftovers(proc.pid)[0] == []
    assert list((cache_dir / "mounts").glob("*.json")) == []
    # the scratch directory of a killed run is swept by the next run
    assert run(cache_dir, rimages.ref("run/plain"), "--", "true").returncode == 0
    assert leftovers(proc.pid) == ([], [])


# -- bad input: one line, non-zero exit ----------------------------------------------------------------


def one_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: "), done.stderr
    for word in words:
        assert word in lines[0]


def test_no_entrypoint_no_cmd(rimages, cache_dir):
    done = run(cache_dir, rimages.ref("run/nocmd"))
    one_line(done, "no Entrypoint or Cmd")
    assert run(cache_dir, rimages.ref("run/nocmd"), "--", "cat", "/etc/motd").stdout == "from the image\n"


def test_foreign_platform(rimages, cache_dir):
    one_line(run(cache_dir, rimages.ref("run/arm")), "linux/arm64", "cannot run")
    one_line(run(cache_dir, "--platform", "linux/arm64", rimages.ref("run/plain")), "linux/arm64", "cannot run")


def test_missing_bwrap(rimages, cache_dir, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # python is run by its full path; bwrap is nowhere
    one_line(run(cache_dir, rimages.ref("run/plain"), env=env), "bwrap")
    assert not cache_dir.exists()  # refused before anything was mounted or fetched


def test_bad_volume_and_unknown_image(rimages, cache_dir, tmp_path):
    one_line(run(cache_dir, "-v", f"{tmp_path}/absent:/x", rimages.ref("run/plain")), "does not exist")
    one_line(run(cache_dir, "-v", "relative", rimages.ref("run/plain")), "HOST:PATH")
    one_line(run(cache_dir, f"{rimages.host}/run/absent:v1"))


# -- the test images themselves -------------------------------------------------------------------------


def test_host_image_holds_the_libraries_ldd_names(rimages):
    with tarfile.open(fileobj=io.BytesIO(im.uncompressed(rimages.layer))) as tar:
        names = {m.name: m for m in tar.getmembers()}
    bash = os.path.realpath(subprocess.run(["sh", "-c", "command -v bash"], capture_output=True, text=True).stdout.strip())
    libs = [line.split("=>")[-1].split("(")[0].strip()
            for line in subprocess.run(["ldd", bash], capture_output=True, text=True).stdout.splitlines() if "/" in line]
    assert libs
    for lib in libs:
        assert hi.in_image(lib) in names, lib
    assert names["bin"].issym() and names["bin"].linkname == "usr/bin"
