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
for path in ["deploy/compose.yaml", "deploy/cluster/compose.yaml", "deploy/k8s/statefulset.yaml", "deploy/k8s/service.yaml"]:
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
echo "-- the cluster compose: the nodes agree on the engines, and the binary takes each node's environment"
CLUSTER_ENV=$(python3 - <<'PY'
import yaml
c = yaml.safe_load(open("deploy/cluster/compose.yaml"))
s = c["services"]
etcd = sorted(n for n in s if n.startswith("etcd-"))
nats = sorted(n for n in s if n.startswith("nats-"))
nodes = sorted(n for n in s if n.startswith("vectord-"))
assert len(etcd) == 3 and len(nats) == 3 and len(nodes) == 3, (etcd, nats, nodes)
want_etcd = ",".join(f"http://{e}:2379" for e in etcd)
want_nats = ",".join(f"nats://{n}:4222" for n in nats)
ids = set()
for n in nodes:
    env = {k: str(v) for k, v in s[n]["environment"].items()}
    assert env["VECTORD_ETCD"] == want_etcd, (n, env["VECTORD_ETCD"])
    assert env["VECTORD_NATS"] == want_nats, (n, env["VECTORD_NATS"])
    assert env["VECTORD_ADVERTISE_ADDR"] == f"{n}:50051", (n, env["VECTORD_ADVERTISE_ADDR"])
    ids.add(env["VECTORD_NODE_ID"])
    assert s[n]["command"] == ["serve"], n
    # One line per node: its environment but the addresses, data dir and engines (moved below).
    print(" ".join(f"{k}={v}" for k, v in sorted(env.items())
                   if k not in ("VECTORD_ADDR", "VECTORD_METRICS_ADDR", "VECTORD_DATA_DIR", "VECTORD_ETCD", "VECTORD_NATS")))
assert len(ids) == 3, f"node ids are not unique: {ids}"
PY
)
bash scripts/cluster.sh start "$DATA/engines" >"$DATA/engines.log" 2>&1 || { cat "$DATA/engines.log"; exit 1; }
trap 'kill $PID ${NODES:-} 2>/dev/null || true; bash scripts/cluster.sh stop "$DATA/engines" >/dev/null 2>&1 || true; rm -rf "$DATA"' EXIT
ENGINES_ENV=$(grep -E '^VECTORD_(ETCD|NATS)=' "$DATA/engines/env")
NODES=""
i=0
while read -r NODE_ENV; do
  i=$((i + 1))
  : >"$DATA/node$i.log"
  env $NODE_ENV $ENGINES_ENV VECTORD_ADDR=127.0.0.1:0 VECTORD_DATA_DIR="$DATA/node$i" \
    "$BIN" serve 2>"$DATA/node$i.log" &
  NODES="$NODES $!"
done <<<"$CLUSTER_ENV"
i=0
for P in $NODES; do
  i=$((i + 1))
  for _ in $(seq 1 600); do
    grep -q "vectord is serving" "$DATA/node$i.log" && break
    kill -0 "$P" || { cat "$DATA/node$i.log"; exit 1; }
    sleep 0.1
  done
  grep -q "joined the cluster" "$DATA/node$i.log" || { echo "node $i did not join"; cat "$DATA/node$i.log"; exit 1; }
  A=$(sed -n 's/.*vectord listening addr=\([0-9.:]*\).*/\1/p' "$DATA/node$i.log" | head -1)
  "$BIN" health --server "http://$A"
  LAST=$A
done
if command -v grpcurl >/dev/null; then
  N=$(grpcurl -plaintext "$LAST" vectord.v1.ClusterService/ListNodes | grep -c '"nodeId"' || true)
  [ "$N" = 3 ] || { echo "ListNodes shows $N nodes, not 3"; grpcurl -plaintext "$LAST" vectord.v1.ClusterService/ListNodes; exit 1; }
  echo "ListNodes: 3 nodes"
fi
kill -TERM $NODES
for P in $NODES; do wait "$P"; done
NODES=""
echo "deploy: all checks passed"
