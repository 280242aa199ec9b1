#!/usr/bin/env bash
# The README's grpcurl tour, as a script. Needs a running server (default 127.0.0.1:50051),
# grpcurl and python3 (to generate a few points).
#   ./examples/grpcurl-tour.sh [host:port]
set -euo pipefail
ADDR="${1:-127.0.0.1:50051}"
g() { echo "\$ grpcurl -plaintext -d '$2' $ADDR $1" | cut -c1-160; grpcurl -plaintext -d "$2" "$ADDR" "$1"; echo; }

echo "\$ grpcurl -plaintext $ADDR list"
grpcurl -plaintext "$ADDR" list
echo

g vectord.v1.IndexService/CreateIndex '{"name": "tour", "dimension": 4, "metric": "METRIC_COSINE"}'

# 60 points on a few directions, so neighbours are easy to read.
POINTS=$(python3 -c '
import json, math
pts = []
for i in range(60):
    a = i * 0.1
    pts.append({"id": str(i), "vector": [math.cos(a), math.sin(a), 0.1 * (i % 3), 1.0]})
print(json.dumps({"index_name": "tour", "points": pts}))')
echo "\$ grpcurl -plaintext -d '{\"index_name\": \"tour\", \"points\": [ ...60 points... ]}' $ADDR vectord.v1.IndexService/UpsertPoints"
grpcurl -plaintext -d "$POINTS" "$ADDR" vectord.v1.IndexService/UpsertPoints
echo

g vectord.v1.IndexService/Search '{"index_name": "tour", "vector": [1, 0, 0, 1], "k": 3}'
g vectord.v1.IndexService/SearchBatch '{"index_name": "tour", "queries": [{"vector": [1, 0, 0, 1]}, {"vector": [0, 1, 0.2, 1]}], "k": 2, "ef_search": 32}'
g vectord.v1.IndexService/DeletePoints '{"index_name": "tour", "ids": ["0"]}'
g vectord.v1.IndexService/PutProfile '{"profile": {"name": "prod", "indexes": [{"index_name": "tour", "default_config": {"m": 16, "ef_construction": 100, "ef_search": 50}}]}}'
g vectord.v1.IndexService/ActivateProfile '{"name": "prod"}'

# Tune by hand: a harness, two trials, promote the better one, activate, roll back.
g vectord.v1.AutotuneService/CreateHarness '{"index_name": "tour", "name": "smoke", "k": 5, "sampled": {"query_count": 10, "seed": 42}}'
g vectord.v1.AutotuneService/RunTrial '{"index_name": "tour", "harness": "smoke", "config": {"m": 8, "ef_construction": 20, "ef_search": 10, "seed": 42}}'
g vectord.v1.AutotuneService/RunTrial '{"index_name": "tour", "harness": "smoke", "config": {"m": 16, "ef_construction": 80, "ef_search": 40, "seed": 42}}'
g vectord.v1.AutotuneService/ListTrials '{"index_name": "tour", "page_size": 1}'
g vectord.v1.PromotionService/Promote '{"index_name": "tour", "trial_id": "2", "promoted_by": "alice", "note": "best recall by hand"}'
g vectord.v1.IndexService/ActivateProfile '{"name": "prod"}'
g vectord.v1.PromotionService/Rollback '{"index_name": "tour"}'

# Autotune: the default grid, streamed; promotes the winner and swaps it in.
g vectord.v1.AutotuneService/Autotune '{"index_name": "tour", "harness": "smoke", "min_recall": 0.9, "activate": true, "requested_by": "tour"}'
g vectord.v1.PromotionService/GetPromoted '{"index_name": "tour"}'
g vectord.v1.AutotuneService/ListJobs '{}'
g vectord.v1.IndexService/GetIndex '{"name": "tour"}'
