"""``imagefs --help`` and the command that starts a background mount stay light: they load no trio,
httpx or pyfuse3 (the verbs import those only when they run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import contextlib, io, json, sys
from imagefs.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--help"], ["mount", "--help"], ["pull", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
with contextlib.redirect_stderr(io.StringIO()):
    code = main(["mount", "alpine", sys.argv[1]])  # the launcher, up to the mountpoint check
from imagefs.mounthelper import translate
translate(["ro", "strict", "platform=linux/arm64"])
print(json.dumps({"code": code, "loaded": sorted(m for m in ("trio", "httpx", "pyfuse3", "rich") if m in sys.modules)}))
"""


def test_help_and_the_mount_launcher_load_no_trio_httpx_pyfuse3(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMAGEFS_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "no-such-dir")], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 1, "loaded": []}
