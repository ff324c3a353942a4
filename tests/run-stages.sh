#!/usr/bin/env bash
# `make test`: every stage CI runs, each timed, all run even if one fails.
#   lint -> unit + host kernel tests -> kernel tests in Debian 6.1, 6.12 and
#   5.10 VMs (full and legacy variants) -> tests of the VM runner itself.
# Gates: PYBPFTUNE_KERNEL_TESTS and PYBPFTUNE_VM_TESTS (unset: run if
# possible, else skip with the reason; 1: must run; 0: skip).
set -u
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
OUT=.test-results
rm -rf "$OUT"; mkdir -p "$OUT"
failed=()
declare -A took

stage() {  # stage NAME CMD...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== stage $name: $*"
  if "$@"; then :; else failed+=("$name"); fi
  took[$name]=$((SECONDS - t0))
  echo "=== stage $name took ${took[$name]}s"
}

vm_possible() {
  command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 is not installed (make deps)"; return 1; }
  return 0
}

pytest_args=(-p no:cacheprovider -q -ra)

stage lint make -s lint
stage host "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/host.xml" tests --ignore=tests/vm
stage wheel tests/wheel-check.sh

vm_stages=1
case "${PYBPFTUNE_VM_TESTS:-}" in
  0) echo "=== VM stages skipped: PYBPFTUNE_VM_TESTS=0"; vm_stages=0 ;;
  1) vm_possible || { failed+=("vm-setup"); vm_stages=0; } ;;
  *) if ! why=$(vm_possible); then echo "=== VM stages skipped: $why"; vm_stages=0; fi ;;
esac
if [ $vm_stages = 1 ]; then
  # One boot per kernel: Debian bookworm 6.1, trixie 6.12 and bullseye 5.10.
  for k in ${VM_KERNELS:-6.1 6.12 5.10}; do
    # In the guests the legacy variant runs only where a test asks for it
    # (all_variants): the loader and tcp_buffer tests, admin back-off.
    stage "vm-$k" env PYBPFTUNE_VARIANTS=full python3 tests/vm/vmtest.py --kernel "$k" --timeout 1800 -- \
      "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/vm-$k.xml" -m "kernel and guest" tests/kernel
  done
  # The service under a real systemd: the 6.1 guest boots systemd as PID 1.
  stage vm-systemd env PYBPFTUNE_SYSTEMD_TESTS=1 python3 tests/vm/vmtest.py --kernel 6.1 --init systemd \
    --timeout 1200 -- "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/vm-systemd.xml" -m systemd \
    tests/kernel/test_systemd_service.py
  stage vm-runner "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/vm-runner.xml" -m vm tests/vm
fi

# One closing line over every stage's pytest results.
"$PY" - "$OUT" <<'PYEOF'
import sys, pathlib, xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for k in tot:
            tot[k] += int(suite.get(k, 0))
bad = tot["failures"] + tot["errors"]
print(f"all stages: {tot['tests'] - bad - tot['skipped']} passed, {bad} failed, {tot['skipped']} skipped")
PYEOF
for name in "${!took[@]}"; do echo "  $name: ${took[$name]}s"; done | sort
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "every stage passed"
