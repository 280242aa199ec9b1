#!/usr/bin/env python3
"""hnswlib's side of vectord's engine benchmark (benches/perf.rs runs this).

Reads the same base vectors, queries and exact ground truth that the Rust bench wrote (fvecs /
ivecs), builds hnswlib indexes with the same M and ef_construction on 1 and 2 threads, and prints
one JSON object: build seconds, recall@k and single-thread QPS per ef_search, all-core batch QPS,
and the resident-memory growth of the 1-thread build.

benches/scale.rs also uses `--builds 2 --save PATH` (build once on 2 threads and save the index)
and `--load PATH --space S --dim D` (one fresh process: load_index's seconds and the process's
resident-memory growth with the loaded index). Its writers-only mode uses `--base B --inserts I`:
build B on 2 threads, then add I 64 points a call on 2 threads (the way vectord's indexer links
writes into a built graph); prints the build's and the inserts' points per second, and the share
of the inserted points a search with their own vector (k 1, at the last --ef) finds first.

Needs numpy and hnswlib (`pip install numpy hnswlib`).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import hnswlib


def hnswlib_version():
    """The installed hnswlib's version (0.8.0's module has no __version__)."""
    try:
        from importlib.metadata import version
        return getattr(hnswlib, "__version__", None) or version("hnswlib")
    except Exception:
        return None


def read_vecs(path, dtype):
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        return np.zeros((0, 0), dtype=dtype)
    dim = int(raw[0])
    rows = raw.reshape(-1, dim + 1)
    return np.ascontiguousarray(rows[:, 1:]).view(dtype)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(space, data, m, efc, threads, seed):
    index = hnswlib.Index(space=space, dim=data.shape[1])
    index.init_index(max_elements=data.shape[0], M=m, ef_construction=efc, random_seed=seed)
    index.set_num_threads(threads)
    start = time.perf_counter()
    index.add_items(data, np.arange(data.shape[0]), num_threads=threads)
    return index, time.perf_counter() - start


def recall(labels, truth, k):
    hits = 0
    for found, exact in zip(labels, truth):
        hits += len(set(found[:k].tolist()) & set(exact[:k].tolist()))
    return hits / (len(truth) * k)


def load_only(path, space, dim):
    rss0 = rss_bytes()
    index = hnswlib.Index(space=space, dim=dim)
    start = time.perf_counter()
    index.load_index(path)
    seconds = time.perf_counter() - start
    json.dump({"engine": "hnswlib", "version": hnswlib_version(),
               "load_seconds": seconds, "rss_delta_bytes": rss_bytes() - rss0,
               "points": index.get_current_count()}, sys.stdout)
    print()


def insert_rate(space, base, inserts, m, efc, seed, ef, chunk=64):
    index = hnswlib.Index(space=space, dim=base.shape[1])
    index.init_index(max_elements=base.shape[0] + inserts.shape[0], M=m, ef_construction=efc,
                     random_seed=seed)
    start = time.perf_counter()
    index.add_items(base, np.arange(base.shape[0]), num_threads=2)
    built = time.perf_counter() - start
    ids = np.arange(base.shape[0], base.shape[0] + inserts.shape[0])
    start = time.perf_counter()
    for i in range(0, inserts.shape[0], chunk):
        index.add_items(inserts[i:i + chunk], ids[i:i + chunk], num_threads=2)
    added = time.perf_counter() - start
    # Each inserted point searched by its own vector (k 1, at ef): the share found first.
    index.set_ef(ef)
    labels, _ = index.knn_query(inserts, k=1, num_threads=2)
    found = float(np.mean(labels[:, 0] == ids))
    json.dump({"engine": "hnswlib", "version": hnswlib_version(),
               "build_per_s": base.shape[0] / built,
               "insert_per_s": inserts.shape[0] / added, "chunk": chunk,
               "found_first": found, "ef": ef}, sys.stdout)
    print()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--dim", type=int)
    p.add_argument("--save")
    p.add_argument("--builds", default="1,2")
    p.add_argument("--base")
    p.add_argument("--queries")
    p.add_argument("--truth")
    p.add_argument("--space", choices=["l2", "cosine", "ip"], required=True)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef", default="10,20,40,80,160")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--inserts")
    a = p.parse_args()
    if a.load:
        load_only(a.load, a.space, a.dim)
        return
    if a.inserts and a.base:
        insert_rate(a.space, read_vecs(a.base, np.float32), read_vecs(a.inserts, np.float32),
                    a.m, a.ef_construction, a.seed, int(a.ef.split(",")[-1]))
        return
    if not (a.base and a.queries and a.truth):
        p.error("--base, --queries and --truth are needed (or --load)")

    base = read_vecs(a.base, np.float32)
    queries = read_vecs(a.queries, np.float32)
    truth = read_vecs(a.truth, np.int32)
    cores = os.cpu_count() or 1

    builds = [int(t) for t in a.builds.split(",")]
    seconds = {}
    rss0 = rss_bytes()
    index, seconds[str(builds[0])] = build(a.space, base, a.m, a.ef_construction, builds[0],
                                           a.seed)
    rss_delta = rss_bytes() - rss0
    for threads in builds[1:]:
        other, seconds[str(threads)] = build(a.space, base, a.m, a.ef_construction, threads,
                                             a.seed)
        del other
    if a.save:
        index.save_index(a.save)

    rows = []
    for ef in [int(x) for x in a.ef.split(",")]:
        index.set_ef(max(ef, a.k))
        labels, _ = index.knn_query(queries, k=a.k, num_threads=1)
        r = recall(labels, truth, a.k)
        start = time.perf_counter()
        for _ in range(a.passes):
            index.knn_query(queries, k=a.k, num_threads=1)
        single = a.passes * len(queries) / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(a.passes):
            index.knn_query(queries, k=a.k, num_threads=cores)
        batch = a.passes * len(queries) / (time.perf_counter() - start)
        rows.append({"ef_search": ef, "recall_at_10": r, "single_thread_qps": single,
                     "all_core_batch_qps": batch})

    json.dump({
        "engine": "hnswlib",
        "version": hnswlib_version(),
        "build_seconds": seconds,
        "rss_delta_bytes": rss_delta,
        "rows": rows,
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
