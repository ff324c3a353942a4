#!/usr/bin/env bash
# The sample outside tuner, as its users get it: examples/sample_tuner built
# from its own directory against the headers of the pybpftune installed in
# VENV (the wheel stage's fresh virtualenv), pip-installed next to it (its
# entry point), then, as root, a daemon running only that tuner sees the
# event of a task it renames.  Usage: tests/sample-tuner-check.sh VENV
set -euo pipefail
venv=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "sample tuner check: $*" >&2; [ -f "$work/log" ] && sed 's/^/  | /' "$work/log" >&2; exit 1; }

cp -r "$root/examples/sample_tuner" "$work/sample"
rm -f "$work"/sample/pybpftune_sample/*.o
make -s -C "$work/sample" PYTHON="$venv/bin/python"
"$venv/bin/python" -m pip install -q "$work/sample"
"$venv/bin/python" - <<'PYEOF'
from importlib.metadata import entry_points
from pybpftune.registry import entry_point_tuners
[cls] = [c for c in entry_point_tuners() if c.name == "sample"]
assert (cls.bpf_dir / "sample_tuner.bpf.o").is_file() and (cls.bpf_dir / "sample_tuner.bpf.legacy.o").is_file()
print("sample tuner installed:", cls.bpf_dir)
PYEOF

if [ "$(id -u)" != 0 ]; then
  echo "sample tuner check: not root, the daemon run is skipped"
  exit 0
fi
"$venv/bin/bpftune" -s -a sample --state-dir "$work/state" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  grep -qs "bpftune started" "$work/log" && break
  kill -0 "$pid" 2>/dev/null || fail "the daemon exited before it started"
  sleep 0.1
done
grep -q "bpftune started" "$work/log" || fail "the daemon did not start within 60 s"
name="sample-w$(( $$ % 10000000 ))"
for _ in $(seq 60); do
  sh -c "printf %s $name > /proc/self/comm"
  sleep 0.5
  grep -q "renamed a task to '$name'" "$work/log" && break
done
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
pid=
grep -q "renamed a task to '$name'" "$work/log" || fail "no event line for the rename to '$name'"
[ "$rc" = 0 ] || fail "the daemon exited with $rc"
grep -E -m 2 "tuner sample started|renamed a task" "$work/log"
echo "sample tuner ok"
