"""A worked example of vectord from Python: create an index, import points, make a harness,
run a streamed autotune (printing each trial as it arrives), promote, and search.

    python3 example.py [host:port[,host:port...]]   # default 127.0.0.1:50051; several: failover

With VECTORD_API_KEY set (or api_key=...), every call carries `authorization: Bearer <key>`;
with VECTORD_TLS_CA set to a CA file (or tls_ca=...), the connection is TLS.
"""
import os
import random
import sys

import grpc

import vectord_stubs

pb, rpc = vectord_stubs.load()


class _BearerKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


def _targets(target):
    """The node addresses in `target`: a "host:port", or several separated by commas, or a list."""
    items = target.split(",") if isinstance(target, str) else list(target)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise ValueError("no vectord address given")
    return items


def _static_target(addresses):
    """One gRPC target over several nodes: each host resolved here to its addresses, in the
    order given, as gRPC's static address list (its `ipv4:`/`ipv6:` resolver takes literal
    addresses only)."""
    import ipaddress
    import socket

    out = []
    for a in addresses:
        host, _, port = a.rpartition(":")
        host = host.strip("[]")
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            ips = [info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)]
        for ip in ips:
            out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if all(":" not in a.rsplit(":", 1)[0] for a in out):
        return "ipv4:" + ",".join(out)
    return "ipv6:" + ",".join(out)


def connect(target, api_key=None, tls_ca=None):
    """A channel to vectord: TLS when tls_ca (a PEM file) is given, the key on every call.

    `target` may name several nodes of a cluster ("10.0.0.1:50051,10.0.0.2:50051", or a list):
    the channel then uses the first node that accepts a connection and, when that node goes
    away, the next one (gRPC's pick_first over the address list). A call in flight when its
    node goes away fails with UNAVAILABLE; the next call goes to the next node. Writes carry
    request_id, so retrying one is safe.
    """
    api_key = api_key if api_key is not None else os.environ.get("VECTORD_API_KEY")
    tls_ca = tls_ca if tls_ca is not None else os.environ.get("VECTORD_TLS_CA")
    addresses = _targets(target)
    options = []
    if len(addresses) > 1:
        # The certificate is checked against the first node's host name, not an address.
        options.append(("grpc.default_authority", addresses[0]))
        options.append(("grpc.service_config", '{"loadBalancingConfig": [{"pick_first": {}}]}'))
        target = _static_target(addresses)
    else:
        target = addresses[0]
    if tls_ca:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if api_key:
        channel = grpc.intercept_channel(channel, _BearerKey(api_key))
    return channel


def run(target, index="py_example", n=300, dim=16, out=print, api_key=None):
    channel = connect(target, api_key=api_key)
    indexes = rpc.IndexServiceStub(channel)
    tune = rpc.AutotuneServiceStub(channel)
    promotions = rpc.PromotionServiceStub(channel)

    indexes.CreateIndex(pb.CreateIndexRequest(name=index, dimension=dim, metric=pb.METRIC_COSINE))
    rng = random.Random(7)
    points = [pb.Point(id=i + 1, vector=[rng.uniform(-1, 1) for _ in range(dim)]) for i in range(n)]

    def batches(size=100):
        for start in range(0, n, size):
            # The first message names the index; the rest may leave it empty.
            yield pb.ImportPointsRequest(index_name=index if start == 0 else "", points=points[start : start + size])

    imported = indexes.ImportPoints(batches())
    out(f"imported {imported.upserted_count} points (index now has {imported.point_count})")

    tune.CreateHarness(
        pb.CreateHarnessRequest(index_name=index, name="smoke", k=10, sampled=pb.SampledQueries(query_count=20, seed=42))
    )
    events = []
    for event in tune.Autotune(pb.AutotuneRequest(index_name=index, harness="smoke", min_recall=0.9, requested_by="python")):
        kind = event.WhichOneof("event")
        events.append(event)
        if kind == "started":
            out(f"job {event.started.job_id}: {len(event.started.grid)} configs")
        elif kind == "trial":
            t = event.trial
            out(
                f"trial {t.id}: ef_construction={t.config.ef_construction} ef_search={t.config.ef_search} "
                f"recall={t.recall:.3f} p50={t.p50_micros:.1f}us"
            )
        elif kind == "progress":
            # At most 2 a second while the job builds or measures (long trials on big indexes).
            for a in event.progress.activities:
                phase = pb.ProgressPhase.Name(a.phase).removeprefix("PROGRESS_PHASE_").lower()
                out(f"  {phase} m={a.config.m} ef_construction={a.config.ef_construction}: {a.done}/{a.total}")
        elif kind == "finished":
            f = event.finished
            out(f"winner trial {f.winner.id} recall={f.winner.recall:.3f} promoted={f.promoted} {f.reason}")
        # Any other kind is from a newer server: ignore it.

    # Promote by hand the fastest trial of the job that still has the winner's recall.
    trials = [e.trial for e in events if e.WhichOneof("event") == "trial"]
    best = max(t.recall for t in trials)
    fastest = min((t for t in trials if t.recall == best), key=lambda t: t.p50_micros)
    promoted = promotions.Promote(
        pb.PromoteRequest(index_name=index, trial_id=fastest.id, promoted_by="python", note="fastest at best recall")
    )
    out(f"promoted trial {promoted.current.trial_id}; history depth {promoted.history_depth}")

    hits = indexes.Search(pb.SearchRequest(index_name=index, vector=points[41].vector, k=3))
    out("search: " + ", ".join(f"{h.id} ({h.distance:.3f})" for h in hits.neighbors))
    return events, promoted, hits


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
