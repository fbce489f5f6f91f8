#!/usr/bin/env bash
# imagefs: set up this machine and mount the demo, or any image, or run the tests.
#
#   ./mount.sh                     install what is missing, start the demo registry, mount the demo at ./mnt/demo
#   ./mount.sh REF [MOUNTPOINT]    the same set-up, then mount REF (default mount point ./mnt/<name>)
#   ./mount.sh test [PYTEST ARGS]  the same set-up, then the whole test suite
#   ./mount.sh stop                unmount ./mnt/* and stop the demo registry
#
# Needs Debian (apt-get) and root for FUSE. Environment: IMAGEFS_DEMO_PORT (5000), PYTHON (python3).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}
DEMO_PORT=${IMAGEFS_DEMO_PORT:-5000}
DEMO_DIR="$here/.demo"
DEMO_REF="127.0.0.1:$DEMO_PORT/demo/imagefs:latest"

say() { printf 'mount.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

install_system() {
    # bubblewrap: imagefs run's sandbox; flatbuffers-compiler: flatc checks zTOCs;
    # golang-go + the stargz library: tests build eStargz / zstd:chunked layers with the real producers
    local pkgs=(fuse3 libfuse3-dev pkg-config attr docker-registry skopeo umoci curl bubblewrap
                flatbuffers-compiler golang-go golang-github-containerd-stargz-snapshotter-dev)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

install_python() {
    if "$PYTHON" - <<'PY' 2>/dev/null; then return 0; fi
import importlib.metadata as m, pyfuse3, trio, httpx, rich, indexed_gzip, zstandard, pytest, pytest_trio, hypothesis, cryptography, bcrypt  # noqa
import imagefs, os
assert os.path.samefile(os.path.dirname(imagefs.__file__), os.path.join(os.getcwd(), "imagefs"))
import importlib.util, shutil  # the passthrough shim (C) is built by pip where there is a compiler
assert not shutil.which("cc") or importlib.util.find_spec("imagefs.fs._passthrough")
PY
    say "installing imagefs and its Python dependencies (pip)"
    "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "running pip as the 'root' user" >&2 || true
    "$PYTHON" -c "import imagefs, pyfuse3" || die "pip install failed"
}

check_fuse() {
    [ -e /dev/fuse ] || die "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
    command -v fusermount3 >/dev/null || die "fusermount3 missing (package fuse3)"
}

start_registry() {
    if curl -fsS -o /dev/null "http://127.0.0.1:$DEMO_PORT/v2/" 2>/dev/null; then return 0; fi
    mkdir -p "$DEMO_DIR/storage"
    cat > "$DEMO_DIR/registry.yml" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DEMO_DIR/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DEMO_PORT
YML
    say "starting the demo registry on 127.0.0.1:$DEMO_PORT (log: .demo/registry.log)"
    nohup docker-registry serve "$DEMO_DIR/registry.yml" >"$DEMO_DIR/registry.log" 2>&1 &
    echo $! > "$DEMO_DIR/registry.pid"
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$DEMO_PORT/v2/" 2>/dev/null && return 0
        sleep 0.1
    done
    die "the demo registry did not start: $(tail -3 "$DEMO_DIR/registry.log")"
}

push_demo() {
    "$PYTHON" -m imagefs.testing.demo --registry "127.0.0.1:$DEMO_PORT" >/dev/null || die "building the demo image failed"
}

install_mount_helper() {
    # mount -t fuse.imagefs and fstab lines: mount(8) runs /sbin/mount.fuse.<type>. Quiet when present.
    if [ "$(id -u)" -ne 0 ]; then
        [ -x /sbin/mount.fuse.imagefs ] || say "not installing /sbin/mount.fuse.imagefs (needs root); imagefs mount works without it"
        return 0
    fi
    "$PYTHON" -m imagefs.mounthelper --install 2>&1 | sed 's/^/mount.sh: /' >&2 || true  # it says why it could not
}

setup() {
    install_system
    install_python
    check_fuse
    install_mount_helper
}

mount_ref() {
    local ref=$1 mnt=$2
    mkdir -p "$mnt"
    if mountpoint -q "$mnt"; then
        say "$mnt is mounted already; unmounting it first"
        "$PYTHON" -m imagefs umount "$mnt"
    fi
    "$PYTHON" -m imagefs mount "$ref" "$mnt"
    say "mounted $ref at $mnt"
    say "try: ls -l $mnt; cat $mnt/root/blob | python3 -m json.tool; getfattr -d -m - $mnt/root"
    say "unmount with: imagefs umount $mnt"
}

case "${1:-}" in
    test)
        shift
        setup
        exec "$PYTHON" -m pytest "$@"
        ;;
    stop)
        for m in "$here"/mnt/*; do mountpoint -q "$m" 2>/dev/null && "$PYTHON" -m imagefs umount "$m"; done
        [ -f "$DEMO_DIR/registry.pid" ] && kill "$(cat "$DEMO_DIR/registry.pid")" 2>/dev/null && rm -f "$DEMO_DIR/registry.pid"
        say "stopped"
        ;;
    -h|--help|help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    "")
        setup
        start_registry
        push_demo
        mount_ref "$DEMO_REF" "$here/mnt/demo"
        ;;
    *)
        ref=$1
        name=${ref##*/}; name=${name%%[:@]*}
        setup
        case "$ref" in 127.0.0.1:"$DEMO_PORT"/*) start_registry; push_demo ;; esac
        mount_ref "$ref" "${2:-$here/mnt/$name}"
        ;;
esac
