"""Runs the worked example against a real vectord started for the test.

The binary is $VECTORD_BIN, else target/debug/vectord (cargo build), else target/release/vectord.
"""
import atexit
import os
import re
import shutil
import subprocess
import tempfile
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import example

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def binary():
    for candidate in [os.environ.get("VECTORD_BIN"), "target/debug/vectord", "target/release/vectord"]:
        if candidate and os.path.exists(os.path.join(ROOT, candidate)):
            return os.path.join(ROOT, candidate)
    pytest.fail("no vectord binary: run `cargo build` first or set VECTORD_BIN")


def start(*flags):
    data = tempfile.mkdtemp(prefix="vectord-py-")
    # Removed when the tests end (every server is stopped by then).
    atexit.register(shutil.rmtree, data, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTORD_")}
    proc = subprocess.Popen(
        [binary(), "serve", "--addr", "127.0.0.1:0", "--data-dir", data, *flags],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    addr = None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"vectord listening addr=(\S+)", line)
        if m:
            addr = m.group(1)
            break
    assert addr, "no listening line:\n" + "".join(lines)
    # Keep draining stderr so the pipe never fills.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    with grpc.insecure_channel(addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for status in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                break
    return proc, addr


@pytest.fixture
def server():
    proc, addr = start()
    yield addr
    proc.terminate()
    assert proc.wait(timeout=60) == 0


@pytest.fixture
def keyed_server():
    proc, addr = start("--api-key", "py-admin-key", "--read-only-api-key", "py-reader-key")
    yield addr
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_create_import_autotune_promote_search(server):
    printed = []
    events, promoted, hits = example.run(server, out=printed.append)
    # Progress events may come between the others (the job reports long builds).
    kinds = [e.WhichOneof("event") for e in events if e.WhichOneof("event") != "progress"]
    assert kinds == ["started"] + ["trial"] * 5 + ["finished"]
    finished = events[-1].finished
    assert finished.promoted and finished.promotion.note.startswith("autotune winner: recall=")
    # The manual promotion pushed the autotune winner onto the history.
    assert promoted.history_depth == 1
    assert hits.neighbors[0].id == 42  # the stored vector of point 42 finds itself first
    assert any(line.startswith("trial ") for line in printed)


def test_errors_carry_codes(server):
    ch = grpc.insecure_channel(server)
    indexes = example.rpc.IndexServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        indexes.GetIndex(example.pb.GetIndexRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        indexes.CreateIndex(example.pb.CreateIndexRequest(name="bad name", dimension=4, metric=example.pb.METRIC_L2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_api_keys(keyed_server, monkeypatch):
    # No key: UNAUTHENTICATED.
    indexes = example.rpc.IndexServiceStub(example.connect(keyed_server, api_key=""))
    with pytest.raises(grpc.RpcError) as e:
        indexes.ListIndexes(example.pb.ListIndexesRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The read-only key reads but may not change anything.
    reader = example.rpc.IndexServiceStub(example.connect(keyed_server, api_key="py-reader-key"))
    assert list(reader.ListIndexes(example.pb.ListIndexesRequest()).indexes) == []
    with pytest.raises(grpc.RpcError) as e:
        reader.CreateIndex(example.pb.CreateIndexRequest(name="x", dimension=4, metric=example.pb.METRIC_L2))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The admin key from the environment runs the whole example (streams included).
    monkeypatch.setenv("VECTORD_API_KEY", "py-admin-key")
    _, _, hits = example.run(keyed_server, out=lambda _: None)
    assert hits.neighbors[0].id == 42


def _names(channel, wait_for_ready=None):
    indexes = example.rpc.IndexServiceStub(channel)
    answer = indexes.ListIndexes(example.pb.ListIndexesRequest(), timeout=10, wait_for_ready=wait_for_ready)
    return [i.name for i in answer.indexes]


def test_several_addresses_fail_over():
    import socket
    import time

    a_proc, a = start()
    b_proc, b = start()
    try:
        with grpc.insecure_channel(a) as ch:
            example.rpc.IndexServiceStub(ch).CreateIndex(
                example.pb.CreateIndexRequest(name="only_on_a", dimension=4, metric=example.pb.METRIC_L2)
            )
        # Nothing listens on `dead` (bound, then closed): the channel goes on to the next node.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        assert _names(example.connect(f"{dead},{a}")) == ["only_on_a"]
        # Two live nodes: the first is used; once it is gone, the next call goes to the other.
        both = example.connect([a, b])
        assert _names(both) == ["only_on_a"]
        a_proc.terminate()
        assert a_proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while True:
            try:
                # wait_for_ready: the call waits for the channel to reach a node, no busy loop.
                assert _names(both, wait_for_ready=True) == [], "answered by the stopped node"
                break
            except grpc.RpcError as e:
                # The call that finds the first node gone may fail; the next one reconnects.
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert time.monotonic() < deadline, "no failover within 30 s"
    finally:
        for p in (a_proc, b_proc):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
