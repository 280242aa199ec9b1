"""A worked example of vectord from Python: create an index, import points, make a harness,
run a streamed autotune (printing each trial as it arrives), promote, and search.

    python3 example.py [host:port]        # default 127.0.0.1:50051
"""
import random
import sys

import grpc

import vectord_stubs

pb, rpc = vectord_stubs.load()


def run(target, index="py_example", n=300, dim=16, out=print):
    channel = grpc.insecure_channel(target)
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
        else:
            f = event.finished
            out(f"winner trial {f.winner.id} recall={f.winner.recall:.3f} promoted={f.promoted} {f.reason}")

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
