#!/usr/bin/env bash
# CI check of the README's quick start: runs, in order, every `$ vectord …` command of each
# fenced block that follows a `<!-- readme-check` line in README.md (or the files given), with
# `vectord` being $VECTORD_BIN, against a real server on a free loopback port over a temp data
# dir. A command must exit 0, and its output must have the shape the README shows: the same
# first word on each line that starts with a letter (`index`, `imported`, `winner:`, …; the
# figures differ from run to run). Extraction: examples/doc_commands.py.
#   VECTORD_BIN=target/debug/vectord bash examples/readme-check.sh [FILE.md ...]
#
# The quick start imports ../shared/data/words_minilm_30k.fvecs. The commands run in a scratch
# directory where that relative path holds the first VECTORD_README_POINTS vectors of the real
# file (default 3000, so the check takes seconds, not minutes); VECTORD_README_POINTS=all uses
# all 30,000. VECTORD_SHARED_DATA names the data directory when it is not ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BIN=$(realpath "${VECTORD_BIN:-target/debug/vectord}")
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(README.md)
SHARED="${VECTORD_SHARED_DATA:-$REPO/../shared/data}"
POINTS="${VECTORD_README_POINTS:-3000}"

TMP=$(mktemp -d)
LOG="$TMP/server.log"
"$BIN" serve --addr 127.0.0.1:0 --data-dir "$TMP/db" 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$TMP"' EXIT

# The commands and the shape of their shown output, before anything runs.
python3 examples/doc_commands.py vectord "${FILES[@]}" >"$TMP/commands"

# `vectord` on the PATH, and ../shared/data/ as the README's commands expect it.
mkdir -p "$TMP/bin" "$TMP/shared/data" "$TMP/work"
ln -s "$BIN" "$TMP/bin/vectord"
for f in words_minilm_30k.fvecs words_minilm_30k.txt; do
  [ -f "$SHARED/$f" ] || { echo "readme check: $SHARED/$f is missing (set VECTORD_SHARED_DATA)"; exit 1; }
done
if [ "$POINTS" = all ]; then
  ln -s "$SHARED/words_minilm_30k.fvecs" "$TMP/shared/data/words_minilm_30k.fvecs"
else
  head -c $((POINTS * 1540)) "$SHARED/words_minilm_30k.fvecs" >"$TMP/shared/data/words_minilm_30k.fvecs"
fi
ln -s "$SHARED/words_minilm_30k.txt" "$TMP/shared/data/words_minilm_30k.txt"

for _ in $(seq 1 600); do
  grep -q "vectord is serving" "$LOG" && break
  kill -0 $PID || { cat "$LOG"; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/.*vectord listening addr=\([0-9.:]*\).*/\1/p' "$LOG" | head -1)
[ -n "$ADDR" ] || { echo "no address in the log"; cat "$LOG"; exit 1; }

n=0
while IFS= read -r cmd && IFS= read -r shape; do
  n=$((n + 1))
  echo "\$ $cmd"
  start=$(date +%s)
  if ! out=$(cd "$TMP/work" && PATH="$TMP/bin:$PATH" VECTORD_SERVER="http://$ADDR" bash -c "$cmd" 2>&1 </dev/null); then
    echo "$out"
    echo "readme check failed: command $n exited non-zero: $cmd"
    exit 1
  fi
  echo "$out"
  echo "  ($(($(date +%s) - start)) s)"
  got=$(printf '%s\n' "$out" | python3 -c '
import json, sys
sys.path.insert(0, "examples")
from doc_commands import first_words
print(json.dumps(first_words(sys.stdin.read().splitlines())))')
  if [ "$got" != "$shape" ]; then
    echo "readme check failed: the output of \`$cmd\` no longer has the shape the README shows"
    echo "  README: $shape"
    echo "  now:    $got"
    exit 1
  fi
done <"$TMP/commands"

kill -TERM $PID
wait $PID || { echo "readme check failed: the server did not exit 0 on SIGTERM"; cat "$LOG"; exit 1; }
echo "readme check: $n commands of ${FILES[*]} ran and printed what the README shows ($POINTS points)"
