#!/usr/bin/env bash
# `make bench` (host) and `make bench-vm` (inside the Debian 6.1 guest): every
# bench, each writing its table (.txt), JSON and PNG to bench/results/<where>/.
#   bench/all.sh host|vm-6.1 [QUICK=1 in the environment: shorter runs]
# In a guest, footprint compares with Oracle's bpftune (bench/reference.py,
# fetched on the host beforehand by `make bench-vm`); the tcp_buffer efficacy
# bench needs sch_netem, which the development host lacks: it runs where
# netem can be set up and says so otherwise.
set -uo pipefail  # a failing bench is reported at the end; the others still run
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
where=${1:-host}
out=bench/results/$where
mkdir -p "$out"
quick=${QUICK:-0}
failed=()
runs=2; rounds=5; secs=5; eff=30
if [ "$quick" = 1 ]; then runs=1; rounds=3; secs=3; eff=15; fi

echo "=== loader and ring-buffer drain"
"$PY" bench/loader_bench.py | tee "$out/loader.txt" || failed+=(loader)

echo "=== footprint"
compare=()
if [ "${PYBPFTUNE_VM:-}" = 1 ]; then
  cg=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
  if ref=$(python3 bench/reference.py --install); then
    compare=(--compare "$ref -c $cg")
  else
    echo "(no reference bpftune: bench/reference.py failed)"
  fi
fi
"$PY" bench/footprint.py --runs "$runs" --legacy --admin-write 5 "${compare[@]}" --label "$where" \
  --json "$out/footprint.json" --png "$out/footprint.png" | tee "$out/footprint.txt" || failed+=(footprint)

echo "=== overhead"
"$PY" bench/overhead.py --rounds "$rounds" --seconds "$secs" --label "$where" \
  --json "$out/overhead.json" --png "$out/overhead.png" | tee "$out/overhead.txt" || failed+=(overhead)

echo "=== tcp_buffer efficacy"
if ip netns add pbtnetemcheck 2>/dev/null && ip netns exec pbtnetemcheck tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
  ip netns del pbtnetemcheck
  "$PY" bench/tcp_buffer_efficacy.py --seconds "$eff" \
    --json "$out/tcp_buffer_efficacy.json" --png "$out/tcp_buffer_efficacy.png" | tee "$out/tcp_buffer_efficacy.txt" \
    || failed+=(tcp_buffer_efficacy)
else
  ip netns del pbtnetemcheck 2>/dev/null || true
  echo "skipped: no sch_netem on this kernel (make bench-vm runs it in the 6.1 guest)" | tee "$out/tcp_buffer_efficacy.txt"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED benches: ${failed[*]}"
  exit 1
fi
