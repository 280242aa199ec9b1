#!/usr/bin/env bash
# The grpcurl tour of docs/grpcurl-tour.md, as a script. Needs a running server (default 127.0.0.1:50051),
# grpcurl and python3 (to generate a few points).
#   ./examples/grpcurl-tour.sh [host:port]
set -euo pipefail
ADDR="${1:-127.0.0.1:50051}"
g() { echo "\$ grpcurl -plaintext -d '$2' $ADDR $1" | cut -c1-160; grpcurl -plaintext -d "$2" "$ADDR" "$1"; echo; }

echo "\$ grpcurl -plaintext $ADDR list"
grpcurl -plaintext "$ADDR" list
echo

g vectord.v1.IndexService/CreateIndex '{"name": "tour", "dimension": 4, "metric": "METRIC_COSINE"}'

# 60 random points (ids 1..60; the generator is seeded, so every run sees the same ones).
POINTS=$(python3 -c '
import json, random
random.seed(7)
pts = [{"id": str(i), "vector": [round(random.uniform(-1, 1), 3) for _ in range(4)]} for i in range(1, 61)]
print(json.dumps({"index_name": "tour", "points": pts}))')
echo "\$ grpcurl -plaintext -d '{\"index_name\": \"tour\", \"points\": [ ...60 points... ]}' $ADDR vectord.v1.IndexService/UpsertPoints"
grpcurl -plaintext -d "$POINTS" "$ADDR" vectord.v1.IndexService/UpsertPoints
echo

g vectord.v1.IndexService/Search '{"index_name": "tour", "vector": [0.3, -0.2, 0.8, 0.1], "k": 3}'
g vectord.v1.IndexService/GetPoint '{"index_name": "tour", "id": "11"}'
g vectord.v1.IndexService/SearchBatch '{"index_name": "tour", "queries": [{"vector": [0.3, -0.2, 0.8, 0.1]}, {"vector": [-1, 0.5, 0, 0]}], "k": 2, "ef_search": 32}'
g vectord.v1.IndexService/DeletePoints '{"index_name": "tour", "ids": ["60"]}'
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
g vectord.v1.AutotuneService/GetParetoFront '{"index_name": "tour", "harness": "smoke"}'
g vectord.v1.AutotuneService/ListJobs '{}'
g vectord.v1.IndexService/GetIndex '{"name": "tour"}'

# ADAPTIVE: the fastest config reaching a target recall, searched instead of a grid.
echo "# adaptive and refresh"
g vectord.v1.AutotuneService/Autotune '{"index_name": "tour", "harness": "smoke", "objective": "OBJECTIVE_TARGET_RECALL", "target_recall": 0.95, "strategy": "STRATEGY_ADAPTIVE", "budget": {"max_trials": 20}}'

# A refresh policy: re-tune by itself after a fifth of the points changed, or under recall 0.9.
g vectord.v1.AutotuneService/SetRefreshPolicy '{"index_name": "tour", "policy": {"mode": "REFRESH_MODE_ON_APPEND", "change_threshold": 0.2, "harness": "smoke", "recall_floor": 0.9, "activate": true}}'
