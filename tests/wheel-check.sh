#!/usr/bin/env bash
# Build the wheel from a clean copy of the committed tree, install it into a
# fresh venv, and run what a user would: `bpftune -S` and `import pybpftune`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work/"
(cd "$work" && python3 -m pip wheel -q --no-deps -w dist . )
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/pybpftune-*.whl
cd "$work"
"$work/venv/bin/python" -c "import pybpftune, pybpftune.bpf as b; assert 'probe' in b.available(); print('import ok:', b.available())"
if [ "$(id -u)" = 0 ]; then
  out=$("$work/venv/bin/bpftune" -S 2>&1)
  echo "$out" | head -2
fi
echo "wheel ok: $(ls "$work"/dist)"
