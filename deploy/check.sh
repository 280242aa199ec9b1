#!/usr/bin/env bash
# CI check of deploy/: the manifests parse, the systemd unit verifies, and the binary accepts
# exactly the command, flags and environment the manifests give it (started for real, with
# only the listen addresses moved to free loopback ports and the data dir to a temp dir), and
# `vectord health` (the image's HEALTHCHECK) answers 0 against it.
#   VECTORD_BIN=target/debug/vectord deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VECTORD_BIN:-target/debug/vectord}"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

echo "-- YAML parses"
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore pyyaml
python3 - <<'PY'
import yaml
for path in ["deploy/compose.yaml", "deploy/k8s/statefulset.yaml", "deploy/k8s/service.yaml"]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert docs, f"{path}: empty"
    print(f"{path}: {len(docs)} document(s)")
PY

echo "-- systemd unit"
if command -v systemd-analyze >/dev/null; then
  TMP=$(mktemp -d)
  sed "s|/usr/local/bin/vectord|$BIN|" deploy/systemd/vectord.service >"$TMP/vectord.service"
  systemd-analyze verify "$TMP/vectord.service"
  echo "systemd-analyze verify: ok"
else
  echo "systemd-analyze not available: skipped"
fi

echo "-- the binary takes the manifests' command, flags and environment"
# Every VECTORD_* variable any manifest sets, with its value (they agree across manifests).
ENV_LINES=$(python3 - <<'PY'
import re, yaml
env = {}
def put(k, v, where):
    if k in env and k not in ("VECTORD_ADDR", "VECTORD_METRICS_ADDR") and env[k] != v:
        raise SystemExit(f"{k} differs: {env[k]!r} vs {v!r} ({where})")
    env.setdefault(k, v)
c = yaml.safe_load(open("deploy/compose.yaml"))
for k, v in c["services"]["vectord"]["environment"].items():
    put(k, str(v), "compose")
ss = yaml.safe_load(open("deploy/k8s/statefulset.yaml"))
for e in ss["spec"]["template"]["spec"]["containers"][0]["env"]:
    put(e["name"], str(e["value"]), "k8s")
for line in open("deploy/systemd/vectord.service"):
    m = re.match(r"Environment=(\w+)=(.*)", line.strip())
    if m:
        put(m.group(1), m.group(2), "systemd")
text = open("deploy/Dockerfile").read().replace("\\\n", " ")
for k, v in re.findall(r"(VECTORD_\w+)=(\S+)", text):
    put(k, v, "Dockerfile")
for k, v in sorted(env.items()):
    print(f"{k}={v}")
PY
)
echo "$ENV_LINES"
HELP=$("$BIN" serve --help)
for k in $(echo "$ENV_LINES" | cut -d= -f1); do
  echo "$HELP" | grep -q "env: $k=" || { echo "vectord serve does not read $k"; exit 1; }
done
DATA=$(mktemp -d)
LOG="$DATA/log"
: >"$LOG" # exists before the background server's redirect opens it, for the poll below
# The manifests' command is `serve` with this environment; only where it listens and stores moves.
env $(echo "$ENV_LINES" | grep -v -e '^VECTORD_ADDR=' -e '^VECTORD_METRICS_ADDR=' -e '^VECTORD_DATA_DIR=') \
  VECTORD_ADDR=127.0.0.1:0 VECTORD_METRICS_ADDR=127.0.0.1:0 VECTORD_DATA_DIR="$DATA/db" \
  "$BIN" serve 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 600); do
  grep -q "vectord is serving" "$LOG" && break
  kill -0 $PID || { cat "$LOG"; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/.*vectord listening addr=\([0-9.:]*\).*/\1/p' "$LOG" | head -1)
grep -q "serving metrics" "$LOG" || { echo "no metrics endpoint"; cat "$LOG"; exit 1; }
# The image's HEALTHCHECK command.
"$BIN" health --server "http://$ADDR"
kill -TERM $PID
wait $PID

echo "-- the bind policy: a non-loopback address without TLS, a key or VECTORD_INSECURE is refused"
set +e
env -u VECTORD_INSECURE VECTORD_ADDR=0.0.0.0:0 VECTORD_DATA_DIR="$DATA/db2" "$BIN" serve 2>"$LOG.refused"
CODE=$?
set -e
[ "$CODE" = 2 ] && grep -q -- "--insecure" "$LOG.refused" || { echo "not refused (exit $CODE)"; cat "$LOG.refused"; exit 1; }
echo "refused with exit 2, as expected"
echo "deploy: all checks passed"
